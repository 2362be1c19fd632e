"""AnyStory training on the user's own images — pure torch, no ComfyUI import: stage 2 (the router, below)
and stage 1 (the subject encoder: :mod:`.stage1`).

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

With ``TrainConfig.reference`` "native" / "shared" the routed reference attention (eq. 6-8) is active as in
the paper: a frozen ReferenceNet (or the frozen UNet itself) gives G_i^l of every instance's reference view,
projected with W̃ (the adapter's, else the UNet's attn1) and routed by the previous layer's router maps (an
index: no gradient reaches the router through it, only through eq. 5 and the routing loss).

Stage 1 (:class:`~.stage1.EncoderTrainer`) trains the subject QFormer, Ŵ, W̃ and the ReferenceNet with the
UNet frozen, routes by the ground-truth masks (no router yet) and drops the CLIP image condition for 10 %
of the samples.

Modules (each piece usable alone; ``scripts/train_router.py`` wires them for real checkpoints):

- ``data``: :func:`scan_dataset`, :class:`InstanceDataset` (folder of images + per-instance masks or an
  instance-id label PNG + optional reference crops and captions), :func:`make_shapes_dataset`;
- ``augment``: :func:`augment_reference`, :func:`reference_views`;
- ``hooks``: the training-mode routing hooks (:class:`RoutingState`, ground truth :func:`instance_index`,
  per-layer loss :func:`layer_routing_loss`, the reference attention) and :func:`gradient_checkpointing`;
- ``reference``: the ReferenceNet pass with gradients (:func:`capture_reference_features`), the trainable
  ReferenceNet (:func:`make_refnet`, :func:`refnet_state_dict`);
- ``stage1``: :class:`EncoderTrainer`, :func:`attach_stage1`, its optimizer and resumable state;
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
from .reference import (
                   capture_reference_features,
                   load_refnet_weights,
                   make_refnet,
                   reference_latents,
                   refnet_state_dict,
)
from .stage1 import (
                   EncoderTrainer,
                   attach_stage1,
                   load_stage1_state,
                   make_stage1_optimizer,
                   restore_stage1_state,
                   save_stage1_state,
)
from .trainer import (
                   REFERENCE_MODES,
                   BatchInputs,
                   Encoders,
                   ReferenceBranch,
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
    "REFERENCE_MODES", "ReferenceBranch",
    # stage 1 and the reference branch
    "EncoderTrainer", "attach_stage1", "make_stage1_optimizer", "save_stage1_state", "load_stage1_state",
    "restore_stage1_state", "capture_reference_features", "make_refnet", "load_refnet_weights",
    "refnet_state_dict", "reference_latents",
    # evaluation
    "iou_per_subject", "layer_group", "RoutingEval", "evaluate_routing", "format_iou_table",
]
