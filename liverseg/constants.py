"""Label values, subject keys, class names and config choices shared by every module."""

BACKGROUND, LIVER, TUMOR = 0, 1, 2
LABEL_VALUES = (BACKGROUND, LIVER, TUMOR)
LABEL_NAMES = {BACKGROUND: "background", LIVER: "liver", TUMOR: "tumor"}

# Keys of a tio.Subject.
IMAGE = "image"
LABEL = "label"
CASE_ID = "case_id"

# The three Dice classes of the seed's evaluation, in report order.
# liver_excl_tumor: label == LIVER; liver_incl_tumor: label in {LIVER, TUMOR};
# tumor: label == TUMOR.
DICE_CLASSES = ("liver_excl_tumor", "liver_incl_tumor", "tumor")

# Names that start with this are never opened (macOS AppleDouble `._liver_N.nii.gz`, dot files).
HIDDEN_PREFIX = "."

# The allowed values of each choice in the config (checked when it loads, liverseg.config) and
# in the functions that take them. Each owning module re-exports its own.
# train.amp, inference.amp (liverseg.devices): "auto" is bf16 autocast on CUDA (fp16 where bf16 is
# unsupported) and fp32 on CPU and MPS; "bf16" and "fp16" force that autocast dtype; "off": fp32.
AMP_MODES = ("auto", "bf16", "fp16", "off")
# train.device: the part before any ":N" (liverseg.devices.resolve_device).
DEVICE_TYPES = ("auto", "cpu", "cuda", "mps")
# inference.blending (liverseg.inference.volume): how overlapping patch probabilities are weighted.
BLENDINGS = ("hann", "average")
# inference.tta_flips: mirrored passes averaged per window (1: none; 2: left-right; 4: and
# anterior-posterior; 8: and inferior-superior, all of nnU-Net's mirrorings).
TTA_FLIPS = (1, 2, 4, 8)
# train.loss and the output head each trains (liverseg.training.losses).
LOSSES = ("bce", "bce_dice", "ce", "ce_dice")
HEADS = ("regions", "softmax")
# train.lr_schedule (liverseg.training.lr_schedules).
LR_SCHEDULES = ("constant", "poly")
# train.resume: "auto" continues from <run.dir>/checkpoints/last.pt when present; "never" does not.
RESUME_MODES = ("auto", "never")
# model.norm, and UNet3D's activation and downsampling (liverseg.model).
NORMS = ("instance", "batch", "none")
ACTIVATIONS = ("leaky_relu", "relu")
DOWNSAMPLINGS = ("maxpool", "strided_conv")
