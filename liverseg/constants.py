"""Label values, subject keys and class names shared by every module."""

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
