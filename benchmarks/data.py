"""Real photographs from inside registry packages, cut into small patches with a label.

The images ship with scikit-image (``skimage.data``) and scikit-learn
(``load_sample_images``), so nothing is downloaded. Each image is halved in size (2x2
mean, so a 16 px patch holds more than flat texture), scaled to ``[-1, 1]`` and split by
rows: the top ``1 - HOLDOUT`` of each image is for training, the bottom strip is held out
for the benchmark, so the benchmark reconstructs patches the model never saw. The label
of a patch is the index of its source image; ``len(NAMES)`` is the null label that
classifier-free guidance uses.
"""

import torch

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry", "china", "flower")
HOLDOUT = 0.125


def _load(name):
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return load_sample_image(name + ".jpg")
    import skimage.data
    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def image(name):
    """One image as a float32 (3, H, W) tensor in [-1, 1], halved by a 2x2 mean."""
    x = torch.as_tensor(_load(name)[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return torch.nn.functional.avg_pool2d(x[None, :, :h, :w], 2)[0]


def images():
    return [image(n) for n in NAMES]


def split(img, part):
    """The training rows (``part="train"``) or the held-out bottom strip (``"test"``)."""
    cut = int(round(img.shape[1] * (1 - HOLDOUT)))
    return img[:, :cut] if part == "train" else img[:, cut:]


class Patches:
    """Random labelled patches of the training rows, drawn from a seeded generator."""

    def __init__(self, size=16, seed=0, part="train"):
        self.size = size
        self.imgs = [split(x, part) for x in images()]
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, n):
        """``n`` patches (n, 3, size, size) and their labels; random image, place and mirror."""
        g, p = self.g, self.size
        labels = torch.randint(len(self.imgs), (n,), generator=g)
        out = torch.empty(n, 3, p, p)
        for j, k in enumerate(labels.tolist()):
            img = self.imgs[k]
            y = int(torch.randint(img.shape[1] - p + 1, (), generator=g))
            x = int(torch.randint(img.shape[2] - p + 1, (), generator=g))
            out[j] = img[:, y:y + p, x:x + p]
        flip = torch.rand(n, generator=g) < 0.5
        out[flip] = out[flip].flip(-1)
        return out, labels


def held_out(n, size=16, seed=1234, min_std=0.1):
    """``n`` fixed held-out patches with labels, cycling through the images.

    Each is the first random draw whose pixel std reaches ``min_std``, so flat sky or
    black background (which any method reconstructs) does not stand in for a photograph.
    """
    imgs = [split(x, "test") for x in images()]
    g = torch.Generator().manual_seed(seed)
    out, labels = torch.empty(n, 3, size, size), torch.arange(n) % len(imgs)
    for j, k in enumerate(labels.tolist()):
        img = imgs[k]
        for _ in range(100):
            y = int(torch.randint(img.shape[1] - size + 1, (), generator=g))
            x = int(torch.randint(img.shape[2] - size + 1, (), generator=g))
            out[j] = img[:, y:y + size, x:x + size]
            if out[j].std() >= min_std:
                break
    return out, labels
