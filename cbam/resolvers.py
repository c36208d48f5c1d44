"""The OmegaConf resolvers the configs use, registered on `import cbam`. Torch-free, so that the tools that
only read records (scripts/compare.py) start in a second or two, not after torch's import."""

from omegaconf import OmegaConf

SMALL_IMAGE = 64  # px and below: the ImageNet stem's 4x reduction would leave stage 1 at 16 px or less


def stem_for(image_size: int) -> str:
    """The stem of an ImageNet-layout ResNet for images of `image_size` px: the model configs' default
    (`stem: ${resnet_stem:${data.image_size}}`), so 28-32 px datasets get the 3x3 stride-1 stem."""
    return "cifar" if int(image_size) <= SMALL_IMAGE else "imagenet"


OmegaConf.register_new_resolver("resnet_stem", stem_for, replace=True)
