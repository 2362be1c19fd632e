"""Router training (AnyStory stage 2) on the user's own images — pure torch, no ComfyUI import.

What is trained: the routing QFormer (``routing_proj``, one query → R_i) and the per-layer routers
(``router.{N}``, :class:`~anystory.router.LayerRouter`, → M_i^l). Everything else is frozen: the SDXL UNet,
the CLIP-H vision model, the subject QFormer (``subject_proj`` → E_i) and the per-layer Ŵ_k^l / Ŵ_v^l
(``ip_adapter.{N}``) — taken from the subject-branch file the user has (IP-Adapter Plus SDXL ViT-H
today, a native AnyStory file later).

One training sample (paper §3.3):

1. each instance i of the target image gets a reference view: the user's ``name_ref{i}.png`` or, by
   default, a crop of the target itself with augmentation (random rotation, crop jitter, zero padding),
   segmented and squared by :func:`anystory.prepare.prepare_subject`; frozen CLIP-H → F_clip;
   frozen subject QFormer → E_i, trainable routing QFormer → R_i; the zero image (the subject branch's
   convention, IP-Adapter's zeros after CLIP normalisation by default) gives the background route N+1
   (E_{N+1}, R_{N+1});
2. the target's latent x0 is noised at a random timestep t of the checkpoint's ε schedule;
3. the frozen UNet runs with AnyStory's routing active at every cross-attention layer l (ComfyUI's
   ``attn2_patch`` + attn2 replace hooks, driven by ``transformer_options``): the layer's router turns
   n = norm2(x) into logits → **straight-through Gumbel-softmax hard maps** σ(M^l) → eq. 5
   (:func:`~anystory.injection.routed_cross_attention_sum`, differentiable in the maps, with η) with the
   frozen Ŵ_k^l / Ŵ_v^l;
4. loss = ε-MSE + λ·L_route, L_route = the mean over layers of :func:`~anystory.router.routing_loss`
   between the *soft* refined map softmax(logits) and the whole-instance masks on that layer's grid
   (background = route N+1); λ = 0.1. Per layer it is eq. 4, (1/N) Σ_i ‖M_i^l − M_i^gt‖²₂: a sum over the
   layer's h·w tokens (``TrainConfig.routing_reduction = "sum"``; ``"mean"`` divides by h·w).

Left out in this version: the routed reference attention (eq. 6-8, ReferenceNet features G_i^l) is not
active during training — it does not depend on the router's parameters except through M^{l-1} and the
router is what is trained. Text-free/image-free dropout of the paper's stage 1 is not used (stage 1 is
not trained here).

Modules (each piece usable alone; ``scripts/train_router.py`` wires them for real checkpoints):

- ``data``: :func:`scan_dataset`, :class:`InstanceDataset` (folder of images + per-instance masks or an
  instance-id label PNG + optional reference crops and captions), :func:`make_shapes_dataset`;
- ``augment``: :func:`augment_reference`, :func:`reference_views`;
- ``hooks``: the training-mode routing hooks (:class:`RoutingState`, ground truth :func:`instance_index`,
  per-layer loss :func:`layer_routing_loss`) and :func:`gradient_checkpointing`;
- ``trainer``: the ε schedule (:func:`sdxl_alphas_cumprod`), :func:`attach_router`, :class:`RouterTrainer`
  (an ``nn.Module`` holding only the trainables, DDP-wrappable; its forward is one UNet call + losses),
  :func:`train_step`, the resumable state (:func:`save_training_state` / :func:`load_training_state`:
  ``torch.save`` of tensors and plain values, read back with ``weights_only=True``), :class:`StepBatches`;
- ``evaluation``: :func:`evaluate_routing` → :class:`RoutingEval` (routing IoU per layer group),
  :func:`format_iou_table`.
"""
from .augment import CLIP_SIZE, AugmentConfig, augment_reference, reference_views, rotate
from .data import (
                   DatasetError,
                   InstanceDataset,
                   SampleFiles,
                   TrainSample,
                   load_image,
                   load_labels,
                   load_mask,
                   make_shapes_dataset,
                   scan_dataset,
)
from .evaluation import RoutingEval, evaluate_routing, format_iou_table, iou_per_subject, layer_group
from .hooks import RoutingState, gradient_checkpointing, instance_index, layer_routing_loss
from .trainer import (
                   BatchInputs,
                   Encoders,
                   RouterTrainer,
                   StepBatches,
                   TrainConfig,
                   alphas_cumprod_from_sigmas,
                   attach_router,
                   encode_targets,
                   export_adapter,
                   load_training_state,
                   make_optimizer,
                   prepare_batch,
                   restore_training_state,
                   save_training_state,
                   sdxl_alphas_cumprod,
                   step_seed,
                   train_step,
                   trainable_state,
)

__all__ = [
    # data
    "DatasetError", "SampleFiles", "scan_dataset", "load_image", "load_mask", "load_labels", "TrainSample",
    "InstanceDataset", "make_shapes_dataset",
    # augment
    "CLIP_SIZE", "AugmentConfig", "rotate", "augment_reference", "reference_views",
    # hooks
    "instance_index", "layer_routing_loss", "RoutingState", "gradient_checkpointing",
    # trainer
    "sdxl_alphas_cumprod", "alphas_cumprod_from_sigmas", "attach_router", "trainable_state", "export_adapter",
    "TrainConfig", "Encoders", "BatchInputs", "encode_targets", "prepare_batch", "RouterTrainer", "make_optimizer",
    "step_seed", "train_step", "save_training_state", "load_training_state", "restore_training_state",
    "StepBatches",
    # evaluation
    "iou_per_subject", "layer_group", "RoutingEval", "evaluate_routing", "format_iou_table",
]
