"""Data sets as uint8 tensors, batched augmentations that return their parameters, pairing x0 <-> views."""
import functools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

STL10_NORM = ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27))  # the STL-10 normalisation of the paper's recipe
FIELDS = ['top', 'left', 'height', 'width', 'flip', 'brightness', 'contrast', 'saturation', 'hue', 'gray', 'sigma']
COL = {f: i for i, f in enumerate(FIELDS)}  # the column of each field in a parameter vector
IDENTITY = torch.tensor([1.0, 1.0, 1.0, 0.0])  # colour jitter factors when jitter is not applied


def fail(msg):
    """A mistake the user can fix: one line on stderr, exit status 1."""
    sys.exit(f'error: {msg}')


def resize_crop(images, size):
    """Resize the shorter side to `size` (bicubic, antialiased) and centre-crop to size x size; uint8 in, uint8 out."""
    if images.shape[-2:] != (size, size):
        images = TF.center_crop(TF.resize(images, size, TF.InterpolationMode.BICUBIC, antialias=True), size)
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
            fail(f'STL-10 files missing in {folder}: {", ".join(missing)}, and the download failed '
                 f'({type(e).__name__}); extract stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ '
                 f'into {root} (a folder of images is --dataset folder)')
    images, labels = [], []
    for part in parts:
        x_path, y_path = (os.path.join(folder, f'{part}_{xy}.bin') for xy in 'Xy')
        n, rest = divmod(os.path.getsize(x_path), 3 * 96 * 96)
        if rest or (part != 'unlabeled' and os.path.getsize(y_path) != n):
            fail(f'{x_path if rest else y_path} is truncated (sizes of {part}_X.bin and {part}_y.bin disagree '
                 f'with {n} images of 3x96x96 bytes); extract STL-10 again')
        x = torch.from_file(x_path, size=n * 3 * 96 * 96, dtype=torch.uint8)
        images.append(resize_crop(x.view(n, 3, 96, 96).transpose(2, 3), size))  # each channel stored column-major
        y = torch.full((n,), -1) if part == 'unlabeled' else torch.from_file(y_path, size=n, dtype=torch.uint8) - 1
        labels.append(y.long())
    return torch.cat(images), torch.cat(labels)


EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
SUN397_PARTITIONS = 'https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip'


def class_folders(root):
    """The class folders of an image folder (links followed), sorted: one listing for every split."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def image_folder(root, size, classes=None):
    """Every image below `root` (links followed), resized once, in torchvision ImageFolder's order (class, then
    sorted paths); labelled by `classes` (default: the class folders; -1 outside them)."""
    if not os.path.isdir(root):
        fail(f'image folder {root} does not exist; point --data-dir at a folder of images')
    rel = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in sorted(os.walk(root, followlinks=True))
           for f in sorted(fs) if f.lower().endswith(EXTENSIONS)]
    folder = {r: r.split(os.sep)[0] if os.sep in r else None for r in rel}
    stray = [r for r in rel if classes is not None and folder[r] not in classes]
    if stray:
        fail(f'{root}: {len(stray)} images are not in a class folder of the training split ({", ".join(stray[:3])}'
             f'{", ..." if len(stray) > 3 else ""}); move or remove them')
    classes = classes or class_folders(root)
    label = {r: classes.index(folder[r]) if folder[r] in classes else -1 for r in rel}
    rel.sort(key=label.get)  # stable: class by class, each in sorted order
    images, kept = load_images([os.path.join(root, r) for r in rel], size, root)
    return images, torch.tensor([label[rel[i]] for i in kept]), classes


def load_images(paths, size, where):
    """uint8 3 x size x size images of the readable files among `paths` (below `where`), and their indices;
    unreadable files are named on stderr and skipped."""
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        loaded = pool.map(functools.partial(load_image, size=size), paths)
        loaded = list(tqdm(loaded, total=len(paths), desc=f'loading {where}', leave=False))
    bad = [p for p, x in zip(paths, loaded) if x is None]
    if bad:
        print(f'skipped {len(bad)} unreadable image files: {", ".join(bad[:5])}{", ..." if len(bad) > 5 else ""}',
              file=sys.stderr)
    if len(bad) == len(paths):
        fail(f'no readable images ({", ".join(EXTENSIONS)}) in {where}')
    kept = [i for i, x in enumerate(loaded) if x is not None]
    return torch.stack([loaded[i] for i in kept]), kept


def sun397(root, split, size):
    """SUN397 partition 1 as AugSelf reads it: Training_01.txt (train) or Testing_01.txt (test), each line labelled
    by its class's place in ClassName.txt; images and partition files in torchvision's folder root/SUN397."""
    folder = os.path.join(root, 'SUN397')
    names = ['ClassName.txt', f'{"Training" if split == "train" else "Testing"}_01.txt']
    try:
        if not os.path.isdir(os.path.join(folder, 'a')):
            torchvision.datasets.SUN397(root, download=True)
        if not all(os.path.exists(os.path.join(folder, n)) for n in names):
            torchvision.datasets.utils.download_and_extract_archive(SUN397_PARTITIONS, folder)
    except Exception as e:
        fail(f'SUN397 images or {" and ".join(names)} missing in {folder}, and the download failed '
             f'({type(e).__name__}); put the images (SUN397.tar.gz) and the partition files (Partitions.zip, both '
             f'from https://vision.princeton.edu/projects/2010/SUN/) there')
    with open(os.path.join(folder, names[0])) as f:
        classes = [line.strip() for line in f if line.strip()]
    with open(os.path.join(folder, names[1])) as f:
        lines = [line.strip() for line in f if line.strip()]
    labels = [next(i for i, c in enumerate(classes) if line.startswith(c + '/')) for line in lines]
    images, kept = load_images([os.path.join(folder, line.lstrip('/')) for line in lines], size, folder)
    return images, torch.tensor(labels)[kept]


def pil_to_uint8(img, size):
    """Any PIL image as uint8 RGB: integer grey (16-bit in image files) scaled by its bit depth, float grey from
    [0, 1] (PIL's convert would clip both)."""
    if img.mode[0] in 'IF':
        full = 1.0 if img.mode == 'F' else 65535.0
        img = img.point(lambda v: v * 255 / full).convert('L')
    return resize_crop(TF.pil_to_tensor(img.convert('RGB')), size)


def load_image(path, size):
    """An image file as uint8 3 x size x size, or None when it cannot be read."""
    try:
        with Image.open(path) as img:
            return pil_to_uint8(img, size)
    except OSError:
        return None


def normalize(x, norm):
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in norm)
    return (x - mean) / std


# ---- augmentations: sample the parameters of every view, then apply them (a pure function of images and parameters)

def sample(n, size, g):
    """Parameters (n x 11, FIELDS) of n views of size x size images, and the order of the four colour operations,
    one for the batch as kornia's ColorJitter draws it."""
    area = size * size * torch.empty(n, 10).uniform_(0.2, 1.0, generator=g)  # RandomResizedCrop, 10 attempts
    ratio = torch.exp(torch.empty(n, 10).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    w, h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    ok = (w <= size) & (h <= size)
    first = ok.float().argmax(1, keepdim=True)  # first attempt that fits; the whole image when none does
    h = torch.where(ok.any(1), h.gather(1, first)[:, 0], size)
    w = torch.where(ok.any(1), w.gather(1, first)[:, 0], size)
    top = (torch.rand(n, generator=g) * (size - h + 1)).floor()
    left = (torch.rand(n, generator=g) * (size - w + 1)).floor()
    flip = (torch.rand(n, generator=g) < 0.5).float()
    jittered = torch.rand(n, 1, generator=g) < 0.8
    bcs, hue = torch.empty(n, 3).uniform_(0.6, 1.4, generator=g), torch.empty(n, 1).uniform_(-0.1, 0.1, generator=g)
    factors = torch.where(jittered, torch.cat([bcs, hue], 1), IDENTITY)
    gray = (torch.rand(n, generator=g) < 0.2).float()
    sigma = torch.where(torch.rand(n, generator=g) < 0.5, torch.empty(n).uniform_(0.1, 2.0, generator=g), 0.0)
    order = torch.rand(4, generator=g).argsort()
    return torch.cat([torch.stack([top, left, h, w, flip], 1), factors, torch.stack([gray, sigma], 1)], 1), order


def param_stats(size, n=200_000):
    """Mean and std of the parameter vector, estimated from the sampler itself with a fixed seed."""
    p, _ = sample(n, size, torch.Generator().manual_seed(0))
    return p.mean(0), p.std(0)


def crop_flip(x, p):
    """Per-sample crop (top, left, height, width in source pixels), bilinear resize back to the input size, flip."""
    n, _, size, _ = x.shape
    j = (torch.arange(size, device=x.device) + 0.5) / size
    top, left, h, w, flip = p[:, :5].T
    ys = (top[:, None] + j * h[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
    xs = (left[:, None] + j * w[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])
    xs = torch.where(flip[:, None] > 0, xs.flip(1), xs)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1)
    return F.grid_sample(x, (2 * grid + 1) / size - 1, mode='bilinear', padding_mode='border', align_corners=False)


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
    """Per-sample Gaussian blur, kernel a tenth of the image side (9 at 96 px, 23 at 224 px), reflected borders."""
    k = int(0.1 * x.shape[-1]) // 2 * 2 + 1
    t = torch.arange(k, device=x.device) - (k - 1) / 2
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    x = F.pad(x, [k // 2] * 4, mode='reflect')
    for dim in (3, 2):  # separable: along the width, then along the height, as sums of shifted images
        y = torch.zeros_like(x.narrow(dim, 0, x.shape[dim] - k + 1))
        for i in range(k):
            y.addcmul_(x.narrow(dim, i, y.shape[dim]), kernel[:, i].view(-1, 1, 1, 1))
        x = y
    return x


# The colour operations, in the order of their factors in FIELDS, as kornia 0.4.1 defines them and the authors' code
# applies them: brightness adds f - 1, contrast scales every pixel (both clamped to [0, 1]), saturation scales HSV's
# S, hue rotates HSV's H.
COLOUR = [lambda x, f: (x + f.view(-1, 1, 1, 1) - 1).clamp_(0, 1), lambda x, f: (x * f.view(-1, 1, 1, 1)).clamp_(0, 1),
          hsv_saturation, hue]


def gray(x, _):
    """kornia 0.4.1's rgb_to_grayscale, written to all three channels."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)


def augment(x, p, order):
    """Views of float images x in [0, 1] from parameters p (n x 11): crop, flip, colour in `order`, gray, blur."""
    x = crop_flip(x, p)
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


def make_views(images, p, order, norm, stats):
    """The pairing the method needs from uint8 images and two draws of `sample` (p: 2 x B x 11, order: 2 x 4):
    x0 (the normalised original), views v1, v2 and standardised parameters a1, a2."""
    x = images.float().div(255)
    mean, std = (s.to(x.device) for s in stats)
    p = p.to(x.device)
    v1, v2 = (normalize(augment(x, p[i], order[i]), norm) for i in range(2))
    return normalize(x, norm), v1, v2, (p[0] - mean) / std, (p[1] - mean) / std


# ---- pictures

def save_grid(tiles, labels, columns, path, size=96):
    """Float images (N x 3 x H x W in [0, 1]) resized to size x size as one PNG grid, each labelled below."""
    lines = max(text.count('\n') + 1 for text in labels)
    tiles = F.pad(TF.resize(tiles, [size, size], antialias=True), (0, 0, 0, 12 * lines + 2), value=1.0)
    img = TF.to_pil_image(torchvision.utils.make_grid(tiles.clamp(0, 1), columns, padding=4, pad_value=1.0))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        draw.multiline_text((4 + i % columns * (size + 4), 4 + i // columns * (tiles.shape[2] + 4) + size + 1), text,
                            fill=(0, 0, 0), spacing=2)
    img.save(path)


def show_views(images, path, n=8):
    """views.png: n originals x0 spread over the data set, each beside its two views v1, v2 labelled with their 11
    parameters."""
    shown, g = torch.linspace(0, len(images) - 1, n).long(), torch.Generator().manual_seed(0)
    x = images[shown].float().div(255)
    draws = [sample(len(x), x.shape[-1], g) for _ in range(2)]
    tiles = torch.stack([x, *(augment(x, p, order) for p, order in draws)], 1).flatten(0, 1)
    text = ('crop {:.0f},{:.0f} {:.0f}x{:.0f}\nflip {:.0f}\nb {:.2f} c {:.2f}\n'
            's {:.2f} h {:+.3f}\ngray {:.0f} blur {:.1f}')
    labels = [t for i, k in enumerate(shown.tolist())
              for t in [f'x0, image {k}', *(text.format(*p[i].tolist()) for p, _ in draws)]]
    save_grid(tiles, labels, 6, path)
