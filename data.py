"""Data sets and their splits (uint8 images in memory, or image files read by DataLoader workers), encoding them with
a frozen encoder, augmentations that return their parameters, pairing x0 <-> views; and the command-line checks both
scripts share."""
import argparse
import contextlib
import math
import os
import pathlib
import re
import sys

import torch
import torch.nn.functional as F
import torchvision
import torchvision.datasets as D
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

STL10_NORM = ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27))  # the STL-10 normalisation of the paper's recipe
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # of ImageNet-100 and any other image folder
PRETRAIN = {'stl10': (96, STL10_NORM), 'imagenet100': (224, IMAGENET_NORM)}  # image size and normalisation of each
FIELDS = ['top', 'left', 'height', 'width', 'flip', 'brightness', 'contrast', 'saturation', 'hue', 'gray', 'sigma']
COL = {f: i for i, f in enumerate(FIELDS)}  # the column of each field in a parameter vector
IDENTITY = torch.tensor([1.0, 1.0, 1.0, 0.0])  # colour jitter factors when jitter is not applied


# ---- command-line checks both scripts share

def fail(msg):
    """A mistake the user can fix: one line on stderr, exit status 1."""
    sys.exit(f'error: {msg}')


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's lines and shows each flag's default."""


def parser(description):
    """argparse whose own errors (a mistyped flag, a value of the wrong type) end in one line and exit 1 too; flags
    are spelled in full."""
    p = argparse.ArgumentParser(description=description, formatter_class=Help, allow_abbrev=False)
    p.error = lambda message: fail(f'{message} (see --help)')
    return p


def require(args, bounds, above=()):
    """One line and exit 1 unless every flag's value is finite and within its bounds (low, high): at least low (above
    it for the flags in `above`) and at most high."""
    for name, (low, high) in bounds.items():
        value, strict = getattr(args, name), name in above
        if value is not None and not (math.isfinite(value) and (value > low if strict else value >= low) and
                                      value <= high):
            fail(f'--{name.replace("_", "-")} must be {"above" if strict else "at least"} {low}'
                 f'{f" and at most {high}" if high < math.inf else ""} (got {value})')


def check_device(name):
    if not re.fullmatch(r'cpu|cuda(:\d+)?', name):
        fail(f'--device {name}: expected cpu, cuda or cuda:N')
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name.startswith('cuda') and int(name[5:] or 0) >= count:
        fail(f'--device {name}: this machine has {count} GPU(s){"" if count else "; use --device cpu"}')


# ---- data sets


def resize_crop(images, size, mode=TF.InterpolationMode.BICUBIC):
    """Resize the shorter side to `size` (antialiased) and centre-crop to size x size; uint8 in, uint8 out."""
    if images.shape[-2:] != (size, size):
        images = TF.center_crop(TF.resize(images, size, mode, antialias=True), size)
    return images


def stl10(root, split, size=96):
    """A split of STL-10 (train, test, unlabeled, train+unlabeled) as uint8 images and labels (-1: unlabelled)."""
    folder, parts = os.path.join(root, 'stl10_binary'), split.split('+')
    names = [f'{part}_X.bin' for part in parts] + [f'{part}_y.bin' for part in parts if part != 'unlabeled']
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        try:  # torchvision fetches and extracts the archive when the machine is online
            torchvision.datasets.STL10(root, split='train', download=True)
        except Exception as e:
            fail(f'STL-10 files missing in {folder}: {", ".join(missing)}, download failed ({type(e).__name__}); '
                 f'extract stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ into {root}')
    images, labels = [], []
    for part in parts:
        x_path, y_path = (os.path.join(folder, f'{part}_{xy}.bin') for xy in 'Xy')
        n, rest = divmod(os.path.getsize(x_path), 3 * 96 * 96)
        if rest or (part != 'unlabeled' and os.path.getsize(y_path) != n):
            fail(f'{x_path if rest else y_path} is truncated: the sizes of {part}_X.bin and {part}_y.bin disagree; '
                 f'extract STL-10 again')
        x = torch.from_file(x_path, size=n * 3 * 96 * 96, dtype=torch.uint8)
        images.append(resize_crop(x.view(n, 3, 96, 96).transpose(2, 3), size))  # each channel stored column-major
        y = torch.full((n,), -1) if part == 'unlabeled' else torch.from_file(y_path, size=n, dtype=torch.uint8) - 1
        labels.append(y.long())
    return torch.cat(images), torch.cat(labels)


UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on a bad file
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
SUN397_PARTITIONS = 'https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip'
SPLITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'splits')  # AugSelf's index files (SOURCE.md)


def list_images(root):
    """Every image file below root in ImageFolder's order (folders sorted, then their files), following links but never
    into a folder already visited or above root (a link to a parent would list its images again); none if root does
    not exist."""
    top, seen, found = os.path.realpath(root), set(), []
    for d, dirs, fs in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen or top.startswith(real + os.sep):  # visited, or an ancestor of root: a loop
            dirs.clear()
            continue
        seen.add(real)
        found.append((d, sorted(f for f in fs if f.lower().endswith(EXTENSIONS))))
    return [os.path.join(d, f) for d, fs in sorted(found) for f in fs]


def class_folders(root):
    """The class folders of an image folder (links followed), sorted: one listing for every split."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def image_folder(root, classes):
    """Paths of the images below root/CLASS for each of `classes`, labelled by the class's place in the list, in
    torchvision ImageFolder's order: class by class, each in sorted order."""
    if not os.path.isdir(root):
        fail(f'image folder {root} does not exist; point --data-dir at a folder of images')
    paths = [list_images(os.path.join(root, c)) for c in classes]
    labels = torch.tensor([k for k, ps in enumerate(paths) for _ in ps], dtype=torch.long)
    return [p for ps in paths for p in ps], labels


def imagenet100(root, split):
    """Paths and labels of ImageNet-100 in root/split (train or val, of class-id folders) as the authors' ImageNet100
    lists them: an ImageFolder (classes sorted, then files) of AugSelf's 100 classes, labelled by the list's order."""
    classes = pathlib.Path(SPLITS, 'imagenet100.txt').read_text().split()
    missing = [c for c in classes if not os.path.isdir(os.path.join(root, split, c))]
    if missing:
        fail(f'{root}/{split} lacks {len(missing)} of the ImageNet-100 class folders ({missing[0]}, ...)')
    paths, labels = image_folder(os.path.join(root, split), sorted(classes))
    return paths, torch.tensor([classes.index(c) for c in sorted(classes)])[labels]


def sun397(root, split):
    """Paths and labels of SUN397 partition 1 as AugSelf reads it: Training_01.txt (train) or Testing_01.txt (test),
    each line labelled by its class's place in ClassName.txt (names and paths hold no spaces); images and partition
    files in root/SUN397."""
    folder = os.path.join(root, 'SUN397')
    names = ['ClassName.txt', f'{"Training" if split == "train" else "Testing"}_01.txt']
    try:
        if not os.path.isdir(os.path.join(folder, 'a')):
            torchvision.datasets.SUN397(root, download=True)
        if not all(os.path.exists(os.path.join(folder, n)) for n in names):
            torchvision.datasets.utils.download_and_extract_archive(SUN397_PARTITIONS, folder)
    except Exception as e:
        fail(f'SUN397 images or {" and ".join(names)} missing in {folder}, download failed ({type(e).__name__}); put '
             f'SUN397.tar.gz\'s images and Partitions.zip\'s files (vision.princeton.edu/projects/2010/SUN) there')
    classes, lines = (pathlib.Path(folder, name).read_text().split() for name in names)
    labels = [next((i for i, c in enumerate(classes) if line.startswith(c + '/')), None) for line in lines]
    if None in labels:
        fail(f'{names[1]} line {labels.index(None) + 1} ({lines[labels.index(None)]}) is of no class in ClassName.txt; '
             f'put both files of Partitions.zip in {folder} again')
    return [os.path.join(folder, line.lstrip('/')) for line in lines], torch.tensor(labels)


def pil_to_uint8(img):
    """Any PIL image as uint8 RGB: integer grey (16-bit in image files) scaled by its bit depth, float grey from
    [0, 1] (PIL's convert would clip both)."""
    if img.mode[0] in 'IF':
        full = 1.0 if img.mode == 'F' else 65535.0
        img = img.point(lambda v: v * 255 / full).convert('L')
    return TF.pil_to_tensor(img.convert('RGB'))


def image_sizes(ds, n=2000):
    """(height, width) of up to n images of ds (Images) drawn with a fixed seed: read from the files' headers (nothing
    decoded), or of the images in memory or of a torchvision data set."""
    drawn = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    if not isinstance(ds.source, list):
        return torch.tensor([ds.read(i)[0].shape[-2:] for i in drawn])
    sizes = []
    for i in drawn:  # a file that is not an image is passed over: the worker that reads it will say so
        with contextlib.suppress(*UNREADABLE), Image.open(ds.source[i]) as img:
            sizes.append(img.size[::-1])
    if not sizes:
        fail(f'none of {len(drawn)} image files drawn at random (e.g. {ds.source[0]}) reads as an image')
    return torch.tensor(sizes)


class Images(torch.utils.data.Dataset):
    """Images by index: uint8 tensors in memory, files decoded by the DataLoader worker that reads them, or a
    torchvision data set of (uint8 image, label) items (labels None). Item i is (x0, label); item (i, key) is (x0, two
    views, their parameters 2 x 11 drawn by a generator seeded with key). x0 is the image resized and centre-cropped to
    `size`; a view is a RandomResizedCrop box drawn on the image's own size and resized to size x size, antialiased;
    flip and colour follow on the device (augment). An unreadable file is named on stderr and replaced by the next
    readable one."""

    def __init__(self, source, labels, size, mode=TF.InterpolationMode.BILINEAR):
        self.source, self.labels, self.size, self.mode = source, labels, size, mode

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        i, key = item if isinstance(item, tuple) else (item, None)
        img, label = self.read(i)
        x0 = resize_crop(img, self.size, self.mode)
        if key is None:
            return x0, label
        p = sample(torch.tensor([img.shape[-2:]] * 2), torch.Generator().manual_seed(key))
        views = [TF.resized_crop(img, *p[v, :4].int().tolist(), [self.size] * 2, antialias=True) for v in range(2)]
        return x0, torch.stack(views), p

    def read(self, i):
        """(uint8 image, label) of image i, or of the first readable one after it."""
        if self.labels is None:
            return self.source[i]
        if torch.is_tensor(self.source):
            return self.source[i], self.labels[i]
        for j in (k % len(self.source) for k in range(i, i + len(self.source))):
            try:
                with Image.open(self.source[j]) as img:
                    return pil_to_uint8(img), self.labels[j]
            except UNREADABLE:
                print(f'skipped unreadable image file {self.source[j]}', file=sys.stderr)
        fail(f'none of the {len(self.source)} image files (e.g. {self.source[0]}) reads as an image')


# name: (torchvision class, keyword arguments of each official split); 'all' marks a data set with no official split
TORCHVISION = {
    'cifar10': (D.CIFAR10, {'train': {'train': True}, 'test': {'train': False}}),
    'cifar100': (D.CIFAR100, {'train': {'train': True}, 'test': {'train': False}}),
    'food101': (D.Food101, {'train': {'split': 'train'}, 'test': {'split': 'test'}}),
    'flowers102': (D.Flowers102, {s: {'split': s} for s in ['train', 'val', 'test']}),
    'pets': (D.OxfordIIITPet, {'train': {'split': 'trainval'}, 'test': {'split': 'test'}}),
    'dtd': (D.DTD, {s: {'split': s, 'partition': 1} for s in ['train', 'val', 'test']}),
    'caltech101': (D.Caltech101, {'all': {}}),
    'aircraft': (D.FGVCAircraft, {s: {'split': s} for s in ['train', 'val', 'test']}),
}


def labelled(name, root, split, size):
    """One split of a labelled data set as (uint8 image resized (bicubic) and centre-cropped to size, label) items:
    stl10, imagenet100 (test: val/), sun397, TORCHVISION's, or an image folder labelled by the classes of its train/."""
    def images(paths, labels):
        return Images(paths, labels, size, TF.InterpolationMode.BICUBIC)
    if name == 'stl10':
        return images(*stl10(root, split, size))
    if name == 'sun397':
        return images(*sun397(root, split))
    if name == 'imagenet100':
        return images(*imagenet100(root, 'val' if split == 'test' else split))
    if name not in TORCHVISION:
        classes = class_folders(os.path.join(root, 'train')) if os.path.isdir(os.path.join(root, 'train')) else []
        if not classes:
            fail(f'--dataset {name}: not one of stl10, imagenet100, sun397, {", ".join(TORCHVISION)}, nor an image '
                 f'folder: {root}/train holds no class folders (an image folder is train/ and test/ of class folders)')
        paths, labels = image_folder(os.path.join(root, split), classes)
        stray = sorted(set(list_images(os.path.join(root, split))) - set(paths))
        if stray:
            fail(f'{root}/{split}: {len(stray)} images are not in a class folder of the training split (e.g. '
                 f'{", ".join(os.path.relpath(p, os.path.join(root, split)) for p in stray[:3])}); move them')
        return images(paths, labels)
    cls, kwargs = TORCHVISION[name]
    try:
        ds = cls(root, **kwargs.get(split, kwargs.get('all')), transform=pil_to_uint8, download=True)
        train = cls(root, **kwargs['train']) if split not in ('train', 'all') and hasattr(ds, 'classes') else ds
    except Exception as e:
        fail(f'{name} ({split}) not found in {root}, download failed ({type(e).__name__}); place the files where '
             f'torchvision.datasets.{cls.__name__}(root="{root}") expects them')
    if getattr(ds, 'classes', None) != getattr(train, 'classes', None):  # torchvision lists them per split (DTD)
        fail(f'{name}: its {split} split lists {len(ds.classes)} classes, train {len(train.classes)}: download again')
    return images(ds, None)


def loader(ds, workers, batches=None):
    """ds's items, 256 at a time in order or as `batches` lists them, read by `workers` processes."""
    return torch.utils.data.DataLoader(ds, 256 if batches is None else 1, batch_sampler=batches, num_workers=workers)


@torch.no_grad()
def encode(encoder, batches, norm, device):
    """Pooled features (eval mode, float32, on the CPU) of batches of uint8 images as they come, with what accompanies
    each batch (labels) concatenated."""
    encoder.eval()
    pairs = [(encoder(TF.normalize(x.to(device).float().div(255), *norm)).cpu(), y)
             for x, y in tqdm(batches, desc='encoding', leave=False)]
    return tuple(torch.cat(t) for t in zip(*pairs))


# ---- augmentations: sample the parameters of every view, then apply them (a pure function of images and parameters)

def sample(sizes, g):
    """Parameters (n x 11, FIELDS) of views of n images of `sizes` (n x 2: height, width); the crop is torchvision's
    RandomResizedCrop, in source pixels."""
    n, (height, width) = len(sizes), sizes.float().T
    area = (height * width)[:, None] * torch.empty(n, 10).uniform_(0.2, 1.0, generator=g)  # 10 attempts
    ratio = torch.exp(torch.empty(n, 10).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    w, h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    ok = (w <= width[:, None]) & (h <= height[:, None]) & (w > 0) & (h > 0)  # a box of one pixel at least
    first, fits = ok.float().argmax(1, keepdim=True), ok.any(1)  # the first attempt that fits, if any
    clamped = (width / height).clamp(3 / 4, 4 / 3)  # none fits: the centre box of the nearest allowed ratio
    h = torch.where(fits, h.gather(1, first)[:, 0], torch.minimum(height, (width / clamped).round()))
    w = torch.where(fits, w.gather(1, first)[:, 0], torch.minimum(width, (height * clamped).round()))
    top = torch.where(fits, (torch.rand(n, generator=g) * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(fits, (torch.rand(n, generator=g) * (width - w + 1)).floor(), ((width - w) / 2).floor())
    flip = (torch.rand(n, generator=g) < 0.5).float()
    jittered = torch.rand(n, 1, generator=g) < 0.8
    bcs, hue = torch.empty(n, 3).uniform_(0.6, 1.4, generator=g), torch.empty(n, 1).uniform_(-0.1, 0.1, generator=g)
    factors = torch.where(jittered, torch.cat([bcs, hue], 1), IDENTITY)
    gray = (torch.rand(n, generator=g) < 0.2).float()
    sigma = torch.where(torch.rand(n, generator=g) < 0.5, torch.empty(n).uniform_(0.1, 2.0, generator=g), 0.0)
    return torch.cat([torch.stack([top, left, h, w, flip], 1), factors, torch.stack([gray, sigma], 1)], 1)


def jitter_order(g):
    """The order of the four colour operations: one for a batch of views, as kornia's ColorJitter draws it."""
    return torch.rand(4, generator=g).argsort()


def param_stats(sizes, n=200_000):
    """Mean and std of the parameter vector, from the sampler itself on images of `sizes` (k x 2), seeded."""
    g = torch.Generator().manual_seed(0)
    p = sample(sizes[torch.randint(len(sizes), (n,), generator=g)], g)
    return p.mean(0), p.std(0)


def hsv_saturation(x, f):
    """kornia's: S = c / v times f, clamped to 1, keeping v = max: each channel moves to v - min(f, v / c) (v - x)."""
    v = x.amax(1, keepdim=True)
    c = v - x.amin(1, keepdim=True)
    return v - torch.minimum(f.view(-1, 1, 1, 1), v / c.clamp_min(1e-12)) * (v - x)


def hue(x, f):
    """Rotate HSV's hue by f turns (kornia and torchvision alike), keeping v = max and c = max - min."""
    v = x.amax(1)
    c = v - x.amin(1)
    r, g, b = ((v.unsqueeze(1) - x) / c.clamp_min(1e-12).unsqueeze(1)).unbind(1)  # distances to the max, in chromas
    h6 = torch.where(r == 0, b - g, torch.where(g == 0, 2 + r - b, 4 + g - r))  # hue in [-1, 5), 6 a turn
    h6 = (h6 + 6 * f.view(-1, 1, 1)).remainder_(6)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h6.unsqueeze(1)).remainder_(6)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_blur(x, sigma):
    """Per-sample Gaussian blur, kernel a tenth of the image side (9 at 96 px, 23 at 224 px), reflected borders: a
    grouped convolution (a kernel per sample and channel) along the width, then one along the height."""
    n, c, k = *x.shape[:2], int(0.1 * x.shape[-1]) // 2 * 2 + 1
    t = torch.arange(k, device=x.device) - (k - 1) / 2
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2).repeat_interleave(c, 0)
    kernel = kernel / kernel.sum(1, keepdim=True)
    x = F.pad(x, [k // 2] * 4, mode='reflect').flatten(0, 1)[None]
    x = F.conv2d(F.conv2d(x, kernel.view(n * c, 1, 1, k), groups=n * c), kernel.view(n * c, 1, k, 1), groups=n * c)
    return x.view(n, c, *x.shape[-2:])


# The colour operations, in the order of their factors in FIELDS, as kornia 0.4.1 defines them and the authors' code
# applies them: brightness adds f - 1, contrast scales every pixel (both clamped to [0, 1]), saturation scales HSV's
# S, hue rotates HSV's H.
COLOUR = [lambda x, f: (x + f.view(-1, 1, 1, 1) - 1).clamp_(0, 1), lambda x, f: (x * f.view(-1, 1, 1, 1)).clamp_(0, 1),
          hsv_saturation, hue]


def gray(x, _):
    """kornia 0.4.1's rgb_to_grayscale, written to all three channels."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)


def augment(x, p, order):
    """Views of float crops x in [0, 1] with parameters p (n x 11): flip, colour in `order`, gray, blur."""
    x = torch.where(p[:, COL['flip'], None, None, None] > 0, x.flip(-1), x)
    for op in order.tolist():  # each operation only on the samples it moves, so the identity is exact
        f = p[:, COL['brightness'] + op]
        x = apply_to(x, f != IDENTITY[op], COLOUR[op], f)
    x = apply_to(x, p[:, COL['gray']] > 0, gray, p[:, COL['gray']])
    return apply_to(x, p[:, COL['sigma']] > 0, gaussian_blur, p[:, COL['sigma']])


def apply_to(x, mask, fn, factor):
    """x, with fn(x, factor) written in place into the rows where mask holds."""
    i = torch.nonzero(mask).squeeze(1)
    if len(i):
        x[i] = fn(x[i], factor[i])
    return x


def make_views(x0, views, p, order, norm, stats):
    """The pairing the method needs from a batch of training items of Images (x0, views: B x 2 x 3 x S x S, both
    uint8; p: B x 2 x 11) and colour orders (2 x 4): x0 and views v1, v2 normalised, standardised parameters a1, a2."""
    mean, std = (s.to(x0.device) for s in stats)
    p = p.to(x0.device)
    v1, v2 = (TF.normalize(augment(views[:, v].float().div(255), p[:, v], order[v]), *norm) for v in range(2))
    return TF.normalize(x0.float().div(255), *norm), v1, v2, (p[:, 0] - mean) / std, (p[:, 1] - mean) / std


# ---- pictures

def show_views(ds, path, n=8):
    """views.png: n originals x0 spread over the data set (Images), each beside its two views v1, v2, two such
    triples to a row, a blank tile after each."""
    shown, g = torch.linspace(0, len(ds) - 1, n).long().tolist(), torch.Generator().manual_seed(0)
    x0, views, p = torch.utils.data.default_collate([ds[(k, k)] for k in shown])
    views = [augment(views[:, v].float().div(255), p[:, v], jitter_order(g)) for v in range(2)]
    tiles = torch.stack([x0.float().div(255), *views, torch.ones_like(views[0])], 1).flatten(0, 1)
    torchvision.utils.save_image(TF.resize(tiles, [96, 96], antialias=True), path, nrow=8, padding=4, pad_value=1)
