"""Data sets and their splits (uint8 images in memory, or image files read by DataLoader workers), encoding them with
a frozen encoder, augmentations that return their parameters, pairing x0 <-> views; and the command-line checks both
scripts share."""
import argparse
import contextlib
import math
import os
import pathlib
import sys

import torch
import torch.nn.functional as F
import torchvision
import torchvision.datasets as D
from PIL import Image
from torchvision.datasets.folder import find_classes
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

STL10_NORM = ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27))  # the STL-10 normalisation of the paper's recipe
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # of ImageNet-100 and any other image folder
# the image size and normalisation of each pretraining data set (folder: any image folder)
PRETRAIN = {'stl10': (96, STL10_NORM), 'imagenet100': (224, IMAGENET_NORM), 'folder': (224, IMAGENET_NORM)}
WORKERS = min(4, os.cpu_count() or 1)  # DataLoader processes that read, decode and crop the images
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
    are spelled in full. Both scripts take --device (torch names a device it cannot use), and print paths whose bytes
    are not UTF-8 as they are."""
    if hasattr(sys.stdout, 'reconfigure'):  # a console (a notebook's stream has none): a path's bytes print as they are
        sys.stdout.reconfigure(errors='surrogateescape')
    p = argparse.ArgumentParser(description=description, formatter_class=Help, allow_abbrev=False)
    p.error = lambda message: fail(f'{message} (see --help)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda or cuda:N')
    return p


def require(args, low, above=()):
    """One line and exit 1 unless every flag of `low` is a finite number of at least its bound, and every flag of
    `above` one above 0: the values that would train or score silently wrong (torch checks --lr, --wd, --workers)."""
    for name, bound in {**low, **dict.fromkeys(above, 0)}.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and (value > bound if name in above else value >= bound)):
            fail(f'--{name.replace("_", "-")} must be {"above" if name in above else "at least"} {bound} (got {value})')


def generator(key):
    """A random stream seeded by key: an int, or a tuple of ints (hashed, alike in every process)."""
    return torch.Generator().manual_seed(hash(key) if isinstance(key, tuple) else key)


# ---- data sets


def resize_crop(images, size, mode=TF.InterpolationMode.BICUBIC):
    """Resize the shorter side to `size` (antialiased) and centre-crop to size x size; uint8 in, uint8 out (an image
    of that size is returned as it is)."""
    return TF.center_crop(TF.resize(images, size, mode, antialias=True), size)


def fetch(download, where):
    """download(): a torchvision reader that fetches and extracts the files when online; offline (a URLError) or when
    it refuses the files, one line passing on what it said and where the files go."""
    try:
        return download()
    except Exception as e:
        fail(f'{type(e).__name__}: {e}; {where}')


def stl10(root, split, size=96):
    """A split of STL-10 (train, test, unlabeled, train+unlabeled) as uint8 images and labels (-1: unlabelled)."""
    folder = os.path.join(root, 'stl10_binary')
    if not os.path.isdir(folder):
        fetch(lambda: torchvision.datasets.STL10(root, split='train', download=True),
              f'extract stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ into {root}')
    images, labels = [], []
    for part in split.split('+'):  # FileNotFoundError names a file that is missing
        x_path, y_path = (os.path.join(folder, f'{part}_{xy}.bin') for xy in 'Xy')
        n, rest = divmod(os.path.getsize(x_path), 3 * 96 * 96)
        y = torch.full((n,), -1) if part == 'unlabeled' else torch.tensor(list(pathlib.Path(y_path).read_bytes())) - 1
        if rest or len(y) != n:
            fail(f'the sizes of {x_path} and {part}_y.bin disagree (a truncated file?): extract STL-10 again')
        x = torch.from_file(x_path, size=n * 3 * 96 * 96, dtype=torch.uint8)
        images.append(resize_crop(x.view(n, 3, 96, 96).transpose(2, 3), size))  # each channel stored column-major
        labels.append(y)
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


def image_folder(root, classes):
    """Paths of the images below root/CLASS for each of `classes` (root itself for ''), labelled by the class's place in
    the list, in torchvision ImageFolder's order: class by class, each in sorted order."""
    paths = [list_images(os.path.join(root, c)) for c in classes]
    if not any(paths):
        fail(f'no image files ({", ".join(EXTENSIONS)}) below {root}; point --data-dir at a folder of images')
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
    where = f'put the images of SUN397.tar.gz and the files of Partitions.zip (vision.princeton.edu) in {folder}'
    if not os.path.isdir(os.path.join(folder, 'a')):
        fetch(lambda: torchvision.datasets.SUN397(root, download=True), where)
    if not all(os.path.exists(os.path.join(folder, n)) for n in names):
        fetch(lambda: torchvision.datasets.utils.download_and_extract_archive(SUN397_PARTITIONS, folder), where)
    classes, lines = (pathlib.Path(folder, name).read_text().split() for name in names)
    labels = [classes.index(os.path.dirname(line)) for line in lines]  # ValueError: a line of no class in the list
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
    drawn = torch.randperm(len(ds), generator=generator(0))[:n].tolist()
    if not isinstance(ds.source, list):
        return torch.tensor([ds.read(i)[0].shape[-2:] for i in drawn])
    sizes = []
    for i in drawn:  # a file that is not an image is passed over: the worker that reads it will say so
        with contextlib.suppress(*UNREADABLE), Image.open(ds.source[i]) as img:
            sizes.append(img.size[::-1])
    return torch.tensor(sizes or [ds.read(drawn[0])[0].shape[-2:]])  # none read: ds.read names why, or finds one


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
        p = sample(torch.tensor([img.shape[-2:]] * 2), generator(key))
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


def labelled(name, root, split, size, mode=TF.InterpolationMode.BICUBIC):
    """One split of a labelled data set as Images, x0 resized (`mode`) and centre-cropped to size: stl10, imagenet100
    (test: val/), sun397, TORCHVISION's, or an image folder labelled by the classes of its train/."""
    readers = {'stl10': lambda: stl10(root, split, size), 'sun397': lambda: sun397(root, split),
               'imagenet100': lambda: imagenet100(root, 'val' if split == 'test' else split)}
    if name in readers:
        return Images(*readers[name](), size, mode)
    if name not in TORCHVISION:  # an image folder: FileNotFoundError if root/train is none, or holds no class folder
        classes, _ = find_classes(os.path.join(root, 'train'))
        paths, labels = image_folder(os.path.join(root, split), classes)
        stray = sorted(set(list_images(os.path.join(root, split))) - set(paths))
        if stray:
            fail(f'{len(stray)} images of {root}/{split} are in no class folder of train/ (e.g. {stray[0]}): move them')
        return Images(paths, labels, size, mode)
    cls, kwargs = TORCHVISION[name]
    where = f'place the files where torchvision.datasets.{cls.__name__}(root="{root}") reads them ({name}, {split})'
    ds = fetch(lambda: cls(root, **kwargs.get(split, kwargs.get('all')), transform=pil_to_uint8, download=True), where)
    train = cls(root, **kwargs['train']) if split not in ('train', 'all') and hasattr(ds, 'classes') else ds
    if getattr(ds, 'classes', None) != getattr(train, 'classes', None):  # torchvision lists them per split (DTD)
        fail(f'{name}: its {split} split lists {len(ds.classes)} classes, train {len(train.classes)}: download again')
    return Images(ds, None, size, mode)


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


def jitter_orders(g):
    """The orders (2 x 4) of the four colour operations for the two view batches of a step: one order a batch, as
    kornia's ColorJitter draws it."""
    return torch.rand(2, 4, generator=g).argsort(1)


def param_stats(sizes, n=200_000):
    """Mean and std of the parameter vector, from the sampler itself on images of `sizes` (k x 2), seeded; a field that
    never varies (every crop of 1-pixel images alike) gets std 1, so it standardises to 0."""
    g = generator(0)
    p = sample(sizes[torch.randint(len(sizes), (n,), generator=g)], g)
    std = p.std(0)
    return p.mean(0), std.where(std > 0, 1.0)


def run_stats(ds, kept=None):
    """The statistics that standardise a run's parameters: those it kept (ckpt.pt's), else drawn as training draws
    them on the image sizes of ds (Images)."""
    return kept if kept is not None else param_stats(image_sizes(ds))


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
    kernel = (-0.5 * (t / sigma[:, None]) ** 2).softmax(1).repeat_interleave(c, 0)  # exp(-t^2 / 2 sigma^2), normalised
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
    colour = [(COL['brightness'] + op, COLOUR[op], IDENTITY[op]) for op in order.tolist()]
    for col, fn, identity in [*colour, (COL['gray'], gray, 0), (COL['sigma'], gaussian_blur, 0)]:
        i = torch.nonzero(p[:, col] != identity).squeeze(1)  # only the samples it moves, so the identity is exact
        if len(i):
            x[i] = fn(x[i], p[i, col])
    return x


def render(x0, views, p, orders):
    """x0 and the views (B x 2 x 3 x S x S) as floats in [0, 1] from a batch of training items of Images (uint8 x0 and
    crops; p: B x 2 x 11) and the colour orders of the two view batches (2 x 4)."""
    views = torch.stack([augment(views[:, v].float().div(255), p[:, v], orders[v]) for v in range(2)], 1)
    return x0.float().div(255), views


def make_views(x0, views, p, orders, norm, stats):
    """The pairing the method needs from a batch of training items (x0, views, p, all on the device): x0 and views v1,
    v2 normalised, and the views' parameters a1, a2 standardised with the run's statistics (mean, std)."""
    x0, views = (TF.normalize(t, *norm) for t in render(x0, views, p, orders))
    a = (p - stats[0].to(p.device)) / stats[1].to(p.device)
    return x0, views[:, 0], views[:, 1], a[:, 0], a[:, 1]


# ---- pictures

def show_views(ds, path, n=8):
    """views.png: n originals x0 spread over the data set (Images), each beside its two views v1, v2, two such
    triples to a row, a blank tile after each."""
    shown = torch.linspace(0, len(ds) - 1, n).long().tolist()
    x0, views = render(*torch.utils.data.default_collate([ds[(k, k)] for k in shown]), jitter_orders(generator(0)))
    tiles = torch.stack([x0, views[:, 0], views[:, 1], torch.ones_like(x0)], 1).flatten(0, 1)
    torchvision.utils.save_image(TF.resize(tiles, [96, 96], antialias=True), path, nrow=8, padding=4, pad_value=1)
