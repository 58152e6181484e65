"""The specification of this implementation: pytest -q test_star.py (CPU, offline, a few minutes on 2 cores)."""
import argparse
import ast
import hashlib
import inspect
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tokenize
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision.datasets.folder import find_classes
from torchvision.transforms.v2 import functional as TF

import data
import eval_linear as ev
import train
from losses import nt_xent
from model import STAR, Experts, Heads, restore
from train import CPUSyncBatchNorm

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = argparse.Namespace(tau=0.2, precision='fp32')  # what train.objective reads of the command line


def training_batch(images, seed=0):
    """A batch of training items (x0, views, p) of images in memory, and two colour orders, as train.py draws them."""
    ds = data.Images(images, torch.zeros(len(images)), images.shape[-1])
    batch = torch.utils.data.default_collate([ds[(i, 1000 * seed + i)] for i in range(len(images))])
    g = torch.Generator().manual_seed(seed)
    return batch, data.jitter_orders(g)


def square(size):
    """The image sizes (1 x 2) of a data set of size x size images."""
    return torch.tensor([[size, size]])


def materialise(ds):
    """All images and labels of a data set of (uint8 image, label) items, read as the probe reads them."""
    batches = list(data.loader(ds, 0))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def write_stl10(root, n_unlabeled=64, n_train=20, n_test=20, seed=0):
    """A tiny STL-10 in the real binary layout: uint8, each image's channels stored column-major; labels 1..10."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(root, 'stl10_binary'), exist_ok=True)
    written = {}
    for part, n in [('unlabeled', n_unlabeled), ('train', n_train), ('test', n_test)]:
        x = torch.randint(0, 256, (n, 3, 96, 96), dtype=torch.uint8, generator=g)
        x.transpose(2, 3).contiguous().numpy().tofile(os.path.join(root, 'stl10_binary', f'{part}_X.bin'))
        written[part] = x
        if part != 'unlabeled':
            labels = (torch.arange(n) % 10 + 1).to(torch.uint8)
            labels.numpy().tofile(os.path.join(root, 'stl10_binary', f'{part}_y.bin'))
    return written


@pytest.fixture(scope='module')
def stl(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('stl'))
    return root, write_stl10(root, n_test=2 * 128 + 4)  # the analysis's CCA needs more than 256 test images


def run(*args, **kw):
    """Run a script of this project as a user would; returns the finished process."""
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600, **kw)


def fails(module, argv):
    """The one line that train.py or eval_linear.py (`module`) run with `argv` in this process ends with, exit 1."""
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code not in (0, None) and str(e.value).startswith('error: ') and '\n' not in str(e.value)
    return str(e.value)


def picture_name(result, dataset, data_dir):
    """The routing picture's name: the checkpoint's hash, then a hash of the data set's name and folder."""
    shown = hashlib.sha256(f'{dataset}\n{os.path.realpath(data_dir)}'.encode()).hexdigest()[:8]
    return f'routing-{result["ckpt_sha256"][:8]}-{shown}.png'


def copy_of(trained, tmp_path):
    """A copy of the module's finished one-epoch run, to change without training it again."""
    out = str(tmp_path / 'run')
    shutil.copytree(os.path.dirname(trained), out)
    return out


def tiny_train_flags(root, out, *extra):
    return ['train.py', '--data-dir', root, '--out-dir', out, '--batch-size', '16', '--experts', '4',
            '--image-size', '32', '--eval-interval', '1', *extra]


# ---------------------------------------------------------------- data

def test_stl10_reader_reads_real_layout(stl):
    root, written = stl
    x, y = data.stl10(root, 'train+unlabeled')
    assert torch.equal(x[:20], written['train']) and torch.equal(x[20:], written['unlabeled'])
    assert y[:20].tolist() == [i % 10 for i in range(20)] and (y[20:] == -1).all()
    small, _ = data.stl10(root, 'test', size=48)
    assert small.shape == (260, 3, 48, 48)
    ref = TF.resize(written['test'][:2], 48, TF.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(small[:2], ref)


def test_stl10_missing_offline_names_layout(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise OSError('no network')
    monkeypatch.setattr(torchvision.datasets, 'STL10', offline)
    with pytest.raises(SystemExit) as e:
        data.stl10(str(tmp_path), 'train+unlabeled')
    assert 'OSError: no network' in str(e.value) and 'stl10_binary.tar.gz' in str(e.value)
    assert str(tmp_path) in str(e.value) and '\n' not in str(e.value)


def write_cats_and_dogs(root):
    """Two class folders of flat-coloured PNGs of several sizes, and one unreadable file."""
    for c, color in [('cat', 10), ('dog', 200)]:
        os.makedirs(root / c)
        for i in range(3):
            img = torch.full((3, 40 + 10 * i, 60), color, dtype=torch.uint8)
            TF.to_pil_image(img).save(root / c / f'{i}.png')
    (root / 'dog' / 'broken.jpg').write_bytes(b'not an image')


def test_image_folder_labels_follow_class_folders(tmp_path):
    write_cats_and_dogs(tmp_path)
    classes, _ = find_classes(str(tmp_path))
    paths, y = data.image_folder(str(tmp_path), classes)
    assert classes == ['cat', 'dog'] and y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert paths[3:] == [str(tmp_path / 'dog' / f) for f in ['0.png', '1.png', '2.png', 'broken.jpg']]
    x, _ = materialise(data.Images(paths[:6], y[:6], 32))
    assert x.shape == (6, 3, 32, 32) and (x[:3] == 10).all() and (x[3:] == 200).all()


def test_an_unreadable_file_is_named_and_replaced_never_crashing_a_worker(tmp_path, capfd):
    write_cats_and_dogs(tmp_path)
    paths, y = data.image_folder(str(tmp_path), ['cat', 'dog'])
    ds = data.Images(paths, y, 32)
    (x, labels), = list(data.loader(ds, 1))  # one worker process reads all seven files
    err = capfd.readouterr().err
    assert err.count('\n') == 1 and f'skipped unreadable image file {tmp_path / "dog" / "broken.jpg"}' in err
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 0] and torch.equal(x[6], x[0])  # the next readable file: cat/0.png
    x0, views, p = next(iter(data.loader(ds, 1, [[(6, 0)]])))  # a training item of it, in a worker too
    assert (x0 == 10).all() and (views == 10).all() and p[0, :, 2:4].max() <= 60
    os.makedirs(tmp_path / 'empty')
    for name in ['0.png', '1.png', '2.png']:
        os.remove(tmp_path / 'dog' / name)  # leaves dog/ with broken.jpg only
    with pytest.raises(SystemExit, match='no image files'):
        train.load_data(train.get_args(['--dataset', 'folder', '--data-dir', str(tmp_path / 'empty')]))
    with pytest.raises(SystemExit, match=r'none of the 1 image files \(e.g. .*broken.jpg\) reads as an image'):
        data.image_sizes(train.load_data(train.get_args(['--dataset', 'folder', '--data-dir', str(tmp_path / 'dog'),
                                                         '--out-dir', str(tmp_path / 'empty' / 'run')]))[0])


def one_view(fields):
    """A parameter row from a dict of the fields that differ from the identity view of a 32 px image."""
    p = dict(top=0, left=0, height=32, width=32, flip=0, brightness=1, contrast=1, saturation=1, hue=0, gray=0, sigma=0)
    p.update(fields)
    return torch.tensor([[float(p[f]) for f in data.FIELDS]])


# Tolerances: float32 images in [0, 1]; the blur is the same formula up to rounding (1e-6); HSV round trips divide
# by the chroma (1e-5). kornia's and torchvision's hue rotations agree; the other colour operations follow kornia,
# tested against closed forms below. Crops are taken by the data set (test_a_view_is_torchvisions_resized_crop...).
@pytest.mark.parametrize('fields, reference, tol', [
    (dict(flip=1), TF.hflip, 0),
    (dict(hue=-0.07), lambda x: TF.adjust_hue(x, -0.07), 1e-5),
    (dict(sigma=1.7), lambda x: TF.gaussian_blur(x, [3, 3], [1.7, 1.7]), 1e-6),
])
def test_each_geometric_operation_matches_torchvision(fields, reference, tol):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = data.augment(x, one_view(fields).expand(2, -1), torch.arange(4))
    assert (out - reference(x)).abs().max() <= tol


def test_identity_parameters_leave_image_unchanged():
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(data.augment(x, one_view({}).expand(3, -1), torch.arange(4)), x, atol=1e-6)


def test_jitter_follows_the_batch_order():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    factors = dict(brightness=1.3, contrast=0.7, saturation=1.3, hue=0.05)
    p = one_view(factors).expand(2, -1)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        ref = x
        for op in order:
            field = data.FIELDS[data.COL['brightness'] + op]
            ref = official_reference(ref, field, factors[field])
        assert (data.augment(x, p, torch.tensor(order)) - ref).abs().max() < 1e-5
    assert (data.augment(x, p, torch.arange(4)) - data.augment(x, p, torch.arange(4).flip(0))).abs().max() > 1e-3


def rgb_to_hsv(x):
    """Textbook RGB -> HSV: h in turns [0, 1), s = chroma / max, v = max."""
    r, g, b = x.unbind(1)
    v, mn = x.amax(1), x.amin(1)
    c = v - mn
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    return torch.stack([torch.where(c > 0, h, 0), torch.where(v > 0, c / torch.where(v > 0, v, 1), 0), v], 1)


def hsv_to_rgb(hsv):
    h, s, v = hsv.unbind(1)
    c = v * s
    h6 = h * 6
    x = c * (1 - (h6 % 2 - 1).abs())
    z = torch.zeros_like(c)
    sector = h6.floor().long() % 6
    table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    rgb = torch.stack([torch.stack(t, 1) for t in table])  # 6 x n x 3 x H x W
    picked = rgb.gather(0, sector[None, :, None].expand(1, -1, 3, -1, -1))[0]
    return picked + (v - c)[:, None]


def official_reference(x, field, f):
    """kornia 0.4.1's functional colour operations, written from their definitions."""
    if field == 'brightness':
        return (x + (f - 1)).clamp(0, 1)
    if field == 'contrast':
        return (x * f).clamp(0, 1)
    hsv = rgb_to_hsv(x)
    if field == 'saturation':
        hsv[:, 1] = (hsv[:, 1] * f).clamp(0, 1)
    else:
        hsv[:, 0] = (hsv[:, 0] + f) % 1
    return hsv_to_rgb(hsv)


@pytest.mark.parametrize('field, f', [('brightness', 1.4), ('brightness', 0.6), ('contrast', 1.35), ('contrast', 0.7),
                                      ('saturation', 1.4), ('saturation', 0.6), ('saturation', 40.0),
                                      ('hue', 0.08), ('hue', -0.1)])
def test_colour_jitter_matches_kornia_definitions(field, f):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[0, :, :4] = 0.95  # saturated pixels make the clamps bite; grey pixels have no hue
    out = data.augment(x, one_view({field: f}).expand(2, -1), torch.arange(4))
    assert (out - official_reference(x, field, f)).abs().max() < 1e-5


def test_textbook_hsv_round_trip_is_identity():  # the reference above is itself right
    x = torch.rand(2, 3, 8, 8)
    assert (hsv_to_rgb(rgb_to_hsv(x)) - x).abs().max() < 1e-5


def test_grayscale_uses_kornia_weights():
    x = torch.rand(1, 3, 32, 32)
    out = data.augment(x, one_view({'gray': 1}), torch.arange(4))
    assert torch.allclose(out[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)


def test_jitter_order_is_drawn_per_view_batch():
    args = argparse.Namespace(seed=0)
    orders = [train.step_orders(args, 0, step).tolist() for step in range(3)]
    assert orders == SEED_0_ORDERS  # pinned: a change of the streams changes every run's views
    assert train.step_orders(argparse.Namespace(seed=1), 0, 0).tolist() != orders[0]


# The colour orders (0 brightness, 1 contrast, 2 saturation, 3 hue) of steps 0, 1, 2 of epoch 0 under seed 0
SEED_0_ORDERS = [[[0, 1, 2, 3], [1, 0, 2, 3]], [[3, 0, 1, 2], [3, 1, 0, 2]], [[0, 2, 3, 1], [2, 1, 3, 0]]]


def test_sampler_distribution():
    p = data.sample(square(96).expand(20000, 2), torch.Generator().manual_seed(1))
    top, left, h, w, flip, b, c, s, hue, gray, sigma = p.T
    assert (top >= 0).all() and (top + h <= 96).all() and (left + w <= 96).all() and (h >= 1).all()
    assert ((h * w / 96 ** 2) >= 0.19).all()  # scale >= 0.2, up to rounding
    jittered = (p[:, 5:9] != data.IDENTITY).any(1).float().mean()
    for rate, expected in [(flip.mean(), 0.5), (gray.mean(), 0.2), ((sigma > 0).float().mean(), 0.5), (jittered, 0.8)]:
        assert abs(rate - expected) < 0.015  # 4.7 binomial standard deviations at n = 20000
    assert b.min() >= 0.6 and b.max() <= 1.4 and hue.abs().max() <= 0.1 and sigma.max() <= 2.0


def test_crop_of_an_image_no_box_fits_is_torchvisions_centre_box():
    """10 x 200: no box of scale >= 0.2 and ratio <= 4/3 fits its height, so RandomResizedCrop takes the centre box
    of ratio 4/3: height 10, width round(10 * 4 / 3) = 13, left (200 - 13) // 2 = 93."""
    p = data.sample(torch.tensor([[10, 200], [200, 10]]), torch.Generator().manual_seed(0))
    reference = torchvision.transforms.RandomResizedCrop.get_params(torch.zeros(1, 10, 200), (0.2, 1.0), (3 / 4, 4 / 3))
    assert p[0, :4].tolist() == list(reference) == [0, 93, 10, 13] and p[1, :4].tolist() == [93, 0, 13, 10]


def test_a_view_is_torchvisions_resized_crop_of_the_decoded_file_inside_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name, (h, w) in [('wide.png', (37, 90)), ('tall.png', (70, 41))]:
        TF.to_pil_image((torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)).save(tmp_path / name)
    ds = data.Images(data.list_images(str(tmp_path)), torch.zeros(2), 32)
    for i in range(2):
        image = torchvision.io.decode_image(ds.source[i])
        height, width = image.shape[1:]
        for key in range(20):
            x0, views, p = ds[(i, key)]
            assert torch.equal(x0, TF.center_crop(TF.resize(image, 32, antialias=True), 32))  # bilinear, as Resize
            for view, (top, left, h, w) in zip(views, p[:, :4].int().tolist()):
                assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
                assert h * w >= 0.19 * height * width and 3 / 4 - 0.05 < w / h < 4 / 3 + 0.05
                assert torch.equal(view, TF.resized_crop(image, top, left, h, w, [32, 32], antialias=True))


def test_parameter_standardisation():
    mean, std = data.param_stats(square(96))
    p = data.sample(square(96).expand(50000, 2), torch.Generator().manual_seed(7))  # another seed than the statistics'
    a = (p - mean) / std
    assert a.mean(0).abs().max() < 0.03 and (a.std(0) - 1).abs().max() < 0.03
    # the values hard-coded in the paper's code for STL-10 follow from the same sampler
    paper_mean = torch.tensor([13.10, 13.15, 69.80, 69.73, 0.499, 1.002, 0.998, 1.000, -0.0001, 0.207, 0.536])
    paper_std = torch.tensor([11.50, 11.36, 14.59, 14.54, 0.500, 0.208, 0.205, 0.206, 0.052, 0.405, 0.658])
    assert ((mean - paper_mean).abs() <= 0.02 * paper_std + 0.2 * (paper_mean.abs() > 10)).all()
    assert ((std - paper_std).abs() / paper_std < 0.03).all()


def test_make_views_pairs_each_original_with_its_views():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    (x0_u8, views, p), order = training_batch(images)
    stats = data.param_stats(square(32), n=1000)
    x0, v1, v2, a1, a2 = data.make_views(x0_u8, views, p, order, data.STL10_NORM, stats)
    assert torch.allclose(x0, TF.normalize(images.float() / 255, *data.STL10_NORM))  # x0: the image itself
    v2_ref = data.augment(views[:, 1].float() / 255, p[:, 1], order[1])
    assert torch.allclose(v2, TF.normalize(v2_ref, *data.STL10_NORM))
    assert torch.allclose(a1 * stats[1] + stats[0], p[:, 0], atol=1e-4)


def test_make_views_renders_the_parameters_it_is_given():
    crops = torch.randint(0, 256, (2, 2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    p = torch.stack([torch.cat([one_view(dict(flip=1, gray=1)), one_view(dict(brightness=1.2))]) for _ in range(2)])
    stats = (torch.zeros(11), torch.ones(11))  # a = p
    x0, v1, v2, a1, a2 = data.make_views(crops[:, 0], crops, p, torch.arange(4).expand(2, 4), data.STL10_NORM, stats)
    x = crops.float() / 255
    flipped = x[:, 0].flip(-1)
    gray = (0.299 * flipped[:, 0] + 0.587 * flipped[:, 1] + 0.114 * flipped[:, 2]).unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.allclose(v1, TF.normalize(gray, *data.STL10_NORM), atol=1e-6)  # view 1: flipped, then grey
    assert torch.allclose(v2, TF.normalize((x[:, 1] + 0.2).clamp(0, 1), *data.STL10_NORM), atol=1e-6)  # brighter
    assert torch.equal(a1, p[:, 0]) and torch.equal(a2, p[:, 1])


def png(path):
    return TF.pil_to_tensor(Image.open(path).convert('RGB'))


def test_views_picture_spreads_its_originals_over_the_data_set(tmp_path):
    images = torch.arange(80, dtype=torch.uint8).mul(3).view(80, 1, 1, 1).expand(80, 3, 32, 32).contiguous()
    data.show_views(data.Images(images, torch.zeros(80), 32), str(tmp_path / 'views.png'))  # image i: grey 3 i
    img = png(tmp_path / 'views.png')
    shown = [img[0, 4 + i // 2 * 100 + 48, 4 + i % 2 * 4 * 100 + 48].item() for i in range(8)]
    assert shown == [3 * i for i in torch.linspace(0, 79, 8).long().tolist()]


def test_views_picture_shows_each_original_beside_its_views(tmp_path):
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data.show_views(data.Images(images, torch.zeros(10), 32), str(tmp_path / 'views.png'))
    img = png(tmp_path / 'views.png')
    assert img.shape == (3, 4 * 100 + 4, 8 * 100 + 4)  # 8 images of 96 px: x0 v1 v2 and a blank, twice per row
    x0 = TF.resize(images[1].float() / 255, [96, 96], antialias=True)
    assert (img[:, 4:100, 404:500].float() / 255 - x0).abs().max() < 1 / 255 + 1e-6  # image 1's x0: row 0, column 4
    assert (img[:, 4:100, 100:104] == 255).all() and (img[:, 4:100, 104:200] != img[:, 4:100, 4:100]).any()
    assert (img[:, 4:100, 300:404] == 255).all()  # a blank tile between the triples
    ds, orders = data.Images(images, torch.zeros(10), 32), data.jitter_orders(data.generator(0))
    for t, k in enumerate(torch.linspace(0, 9, 8).long().tolist()):  # triple t: image k's x0, then its two views
        x0_k, views, p = ds[(k, k)]
        tiles = [x0_k.float() / 255] + [data.augment(views[v:v + 1].float() / 255, p[v:v + 1], orders[v])[0]
                                        for v in (0, 1)]
        for j, tile in enumerate(tiles):
            top, left = 4 + t // 2 * 100, 4 + (t % 2 * 4 + j) * 100
            drawn = img[:, top:top + 96, left:left + 96].float() / 255
            assert (drawn - TF.resize(tile, [96, 96], antialias=True)).abs().max() < 1 / 255 + 1e-6


# ---------------------------------------------------------------- model

def independent_experts(batched):
    """N separate nn.Sequential MLPs holding the batched experts' weights."""
    n, d, hidden = batched.w1.shape
    mlps = []
    for k in range(n):
        mlp = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                            nn.Linear(hidden, 128))
        mlp[0].weight.data = batched.w1[k].T.clone()
        mlp[3].weight.data = batched.w2[k].T.clone()
        mlp[6].weight.data, mlp[6].bias.data = batched.w3[k].T.clone(), batched.b3[k].clone()
        for i, bn in [(1, batched.bn1), (4, batched.bn2)]:
            part = slice(k * hidden, (k + 1) * hidden)
            mlp[i].weight.data, mlp[i].bias.data = bn.weight[part].clone() + 0.1 * k, bn.bias[part].clone() - 0.1 * k
            bn.weight.data[part], bn.bias.data[part] = mlp[i].weight.data, mlp[i].bias.data
        mlps.append(mlp)
    return mlps


def test_batched_experts_equal_independent_mlps():
    torch.manual_seed(0)
    batched = Experts(4, 32)
    mlps = independent_experts(batched)
    h = torch.randn(16, 32)
    for mode in ['train', 'train', 'eval']:  # two training steps move the running statistics, then eval uses them
        for m in [batched, *mlps]:
            m.train(mode == 'train')
        out = batched(h)
        ref = torch.stack([mlp(h) for mlp in mlps], 1)
        assert out.shape == (16, 4, 128) and torch.allclose(out, ref, atol=1e-5)


def test_each_router_gives_a_distribution_over_experts():
    torch.manual_seed(0)
    heads = Heads('star', 32, n_experts=5)
    weights = heads.routing(torch.randn(8, 32))
    assert all(torch.allclose(w.sum(1), torch.ones(8)) and (w > 0).all() for w in weights)
    assert not torch.allclose(weights[0], weights[1])  # two routers, one per task


def test_routing_weights_pass_gradient_to_the_features():
    """With the experts' outputs held fixed, the loss still depends on h through s = softmax(R(h))."""
    torch.manual_seed(0)
    heads = Heads('star', 32, n_experts=5)
    e = torch.randn(8, 5, 128)
    heads.experts.forward = lambda h: e
    h = torch.randn(8, 32, requires_grad=True)
    out = heads(h)
    (out['z_inv'].square().sum() + out['z_eq'].square().sum()).backward()
    assert h.grad is not None and h.grad.abs().min() > 0


def test_uniform_router_averages_the_experts():
    torch.manual_seed(0)
    heads = Heads('star', 32, n_experts=5)
    h = torch.randn(8, 32)
    nn.init.zeros_(heads.router_inv.weight), nn.init.zeros_(heads.router_inv.bias)
    assert torch.allclose(heads(h)['z_inv'], heads.experts(h).mean(1), atol=1e-6)


def test_fixed_heads_mix_experts_as_the_paper():
    torch.manual_seed(0)
    h = torch.randn(8, 32)
    shared = Heads('shared', 32)
    e, z = shared.experts(h), shared(h)
    assert torch.allclose(z['z_inv'], e[:, 0] + e[:, 2], atol=1e-6)
    assert torch.allclose(z['z_eq'], e[:, 1] + e[:, 2], atol=1e-6)
    separate = Heads('separate', 32)
    e, z = separate.experts(h), separate(h)
    assert torch.equal(z['z_inv'], e[:, 0]) and torch.equal(z['z_eq'], e[:, 1])


def test_shift_predictor_is_residual():
    torch.manual_seed(0)
    model = STAR('resnet18', 'star', 4)
    nn.init.zeros_(model.shift.phi.w3), nn.init.zeros_(model.shift.phi.b3)
    z0, a = torch.randn(6, 128), torch.randn(6, 11)
    assert torch.equal(model.shift(z0, a), z0)  # z_hat = z0 + phi([z0; psi(a)]) with phi = 0


def test_forward_wires_the_paper():
    """z_hat_i = z0 + phi([z0; psi(a_i)]) with z0 = z_eq(f(x0)); targets z_eq(f(v_i)); z_task = sum_k s_task,k E_k."""
    torch.manual_seed(0)
    model = STAR('resnet18', 'star', 3).eval()
    x0, v1, v2 = (torch.randn(4, 3, 32, 32) for _ in range(3))
    a1, a2 = torch.randn(4, 11), torch.randn(4, 11)
    out = model(x0, v1, v2, a1, a2)
    h0, h1, h2 = (model.encoder(x) for x in (x0, v1, v2))
    e0, e1 = model.heads.experts(h0), model.heads.experts(h1)
    s_eq0 = model.heads.router_eq(h0).softmax(1)
    z0 = (s_eq0[:, :, None] * e0).sum(1)
    assert torch.allclose(out['z0'], z0, atol=1e-5)
    phi = model.shift.phi
    for z_hat, a in zip(out['z_hat'], (a1, a2)):
        y = torch.cat([z0, model.shift.psi(a)], 1)
        y = phi.bn1(y @ phi.w1[0]).relu()
        y = phi.bn2(y @ phi.w2[0]).relu()
        assert torch.allclose(z_hat, z0 + y @ phi.w3[0] + phi.b3[0], atol=1e-5)
    s_inv1, s_eq1 = model.heads.router_inv(h1).softmax(1), model.heads.router_eq(h1).softmax(1)
    assert torch.allclose(out['z_inv'][0], (s_inv1[:, :, None] * e1).sum(1), atol=1e-5)
    assert torch.allclose(out['z_eq'][0], (s_eq1[:, :, None] * e1).sum(1), atol=1e-5)
    assert torch.allclose(out['z_eq'][1], model.embed(v2)['z_eq'], atol=1e-5)
    assert torch.allclose(out['s_inv'][:4], s_inv1) and torch.allclose(out['s_eq'][4:], model.heads(h2)['s_eq'])


def test_simclr_does_no_equivariant_work():
    simclr = STAR('resnet18', 'simclr')
    assert not hasattr(simclr, 'shift') and hasattr(STAR('resnet18', 'star', 2), 'shift')
    assert simclr.heads.experts.w1.shape[0] == 1
    calls = []
    simclr.encoder.register_forward_hook(lambda *a: calls.append(1))
    out = simclr(None, torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), None, None)
    assert len(calls) == 2 and 'z_eq' not in out and 'z_hat' not in out


def test_encoder_initialisation_is_the_authors():
    """zero_init_residual's zeroed BN gammas, then every conv reset to uniform +-1/sqrt(fan_in) (std bound/sqrt(3))."""
    torch.manual_seed(0)
    model = STAR('resnet18', 'star', 2)
    for name, m in model.encoder.named_modules():
        if isinstance(m, nn.Conv2d):
            bound = m.weight[0].numel() ** -0.5
            assert m.weight.abs().max() <= bound, name
            assert abs(m.weight.std() / bound - 3 ** -0.5) < 0.05 * 3 ** -0.5 + 0.1 * (m.weight.numel() < 1000), name
    blocks = [block for layer in [model.encoder.layer1, model.encoder.layer4] for block in layer]
    assert all((block.bn2.weight == 0).all() for block in blocks)
    for linear in [model.heads.router_inv, model.shift.psi]:
        bound = linear.in_features ** -0.5
        assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound
    assert model.heads.experts.w1.abs().max() <= 512 ** -0.5 and model.shift.phi.w1.abs().max() <= 256 ** -0.5


def test_forward_encodes_original_first():
    torch.manual_seed(0)
    model = STAR('resnet18', 'star', 2)
    seen = []
    model.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x0, v1, v2 = (torch.randn(2, 3, 32, 32) for _ in range(3))
    model(x0, v1, v2, torch.randn(2, 11), torch.randn(2, 11))
    assert [x.data_ptr() for x in seen] == [x0.data_ptr(), v1.data_ptr(), v2.data_ptr()]


def test_encoder_export_loads_into_torchvision():
    model = STAR('resnet18', 'separate')
    missing, unexpected = torchvision.models.resnet18().load_state_dict(model.encoder.state_dict(), strict=False)
    assert sorted(missing) == ['fc.bias', 'fc.weight'] and not unexpected


# ---------------------------------------------------------------- losses

def nt_xent_loop(a, b, tau):
    """NT-Xent written out anchor by anchor."""
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    n, total = len(a), 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = sum(math.exp(z[i] @ z[k] / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / tau) / others)
    return total / (2 * n)


def test_nt_xent_matches_loop_reference():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert abs(nt_xent(a, b, 0.2).item() - nt_xent_loop(a, b, 0.2)) < 1e-4


def test_nt_xent_closed_forms():
    m, tau = 4, 0.2
    e = torch.eye(2 * m)  # orthonormal rows
    # identical pairs, all other rows orthogonal: -log(e^{1/tau} / (e^{1/tau} + 2m-2))
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * m - 2))
    assert math.isclose(nt_xent(e[:m], e[:m], tau).item(), expected, rel_tol=1e-5)
    # orthogonal pairs and all rows orthogonal: every similarity is 0, the loss is log(2m-1)
    assert math.isclose(nt_xent(e[:m], e[m:], tau).item(), math.log(2 * m - 1), rel_tol=1e-5)


def test_nt_xent_uses_its_temperature():
    """a = (e1, e2), b = (e1, e3): the anchors of image 0 see their positive at similarity 1 and two negatives at 0;
    those of image 1 see three keys at 0. Mean of 2 log(1 + 2 e^{-1/tau}) and 2 log 3, here at tau = 0.5."""
    e = torch.eye(3)
    a, b = torch.stack([e[0], e[1]]), torch.stack([e[0], e[2]])
    expected = (2 * math.log(1 + 2 * math.exp(-1 / 0.5)) + 2 * math.log(3)) / 4
    assert math.isclose(nt_xent(a, b, 0.5).item(), expected, rel_tol=1e-5)


def test_equivariant_loss_treats_other_view_as_negative():
    tau = 0.2
    t0, t1, t1b = torch.eye(3)  # image 0's two views embed identically (t0, t0); image 1's differ (t1, t1b)
    z = torch.stack([t0, t1, t0, t1b])  # targets [z_eq(v1); z_eq(v2)], predictions equal to them
    # anchors holding t0 see their positive and two equal negatives (the other view, as target and as prediction)
    expected = (4 * math.log(3 + 4 * math.exp(-1 / tau)) + 4 * math.log(1 + 6 * math.exp(-1 / tau))) / 8
    assert math.isclose(nt_xent(z, z, tau).item(), expected, rel_tol=1e-5)
    assert nt_xent(z, z, tau).item() > 0.5  # had the other view not been a negative, it would be about 0.05


# ---------------------------------------------------------------- training

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_log(out):
    return read_jsonl(os.path.join(out, 'log.jsonl'))


@pytest.fixture(scope='module')
def full_run(stl, tmp_path_factory):
    """A three-epoch run of train.py as a user starts it."""
    root, _ = stl
    full = str(tmp_path_factory.mktemp('full'))
    done = run(*tiny_train_flags(root, full, '--epochs', '3'))
    assert done.returncode == 0, done.stderr
    return full


def test_training_logs_every_epoch(full_run):
    log = read_log(full_run)
    assert [e['epoch'] for e in log] == [1, 2, 3] and log[-1]['lr'] < log[0]['lr']
    assert all(abs(sum(e['routing']['inv']) - 1) < 1e-4 and len(e['routing']['eq']) == 4 for e in log)
    assert all(0 <= e['knn_top1'] <= 1 and e['loss_inv'] > 0 and e['loss_eq'] > 0 for e in log)


def test_run_writes_its_views_picture(full_run):
    assert png(os.path.join(full_run, "views.png")).shape == (3, 404, 804)


def test_encoder_export_of_a_run_loads_into_torchvision(full_run):
    encoder = torchvision.models.resnet18()
    encoder.fc = nn.Identity()
    saved = torch.load(os.path.join(full_run, 'encoder.pt'), weights_only=True)
    encoder.load_state_dict(saved['backbone'])  # the authors' layout, with what the probe needs beside it
    assert saved['image_size'] == 32 and saved['norm'] == data.STL10_NORM


def test_killed_run_resumed_equals_uninterrupted_run(stl, full_run, tmp_path):
    root, _ = stl
    full, killed = full_run, str(tmp_path / 'killed')
    proc = subprocess.Popen([sys.executable, *tiny_train_flags(root, killed, '--epochs', '3')], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(os.path.join(killed, 'ckpt.pt')) and proc.poll() is None:  # epoch 1 is saved
        time.sleep(0.02)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and len(read_log(killed)) == 1, 'the run ended before it could be killed'
    resumed = run(*tiny_train_flags(root, killed, '--epochs', '3', '--resume'))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(os.path.join(full, 'ckpt.pt'), weights_only=True)
    b = torch.load(os.path.join(killed, 'ckpt.pt'), weights_only=True)
    assert a['epoch'] == b['epoch'] == 3
    differ = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    gap = max([(a['model'][k].float() - b['model'][k].float()).abs().max().item() for k in differ], default=0)
    assert not differ, f'{len(differ)} tensors differ, first {differ[:3]}, max |difference| {gap}'
    assert [e['epoch'] for e in read_log(killed)] == [1, 2, 3]


def test_views_are_a_function_of_seed_epoch_and_step():
    args = argparse.Namespace(seed=3, batch_size=8, epochs=3)
    items = list(train.steps(40, args, 0, 0, 1))
    assert len(items) == 15 and items == list(train.steps(40, args, 0, 0, 1))
    assert items[5:] == list(train.steps(40, args, 1, 0, 1))  # a run resumed at epoch 1 draws the same items
    keys = [{k for step in items[5 * e:5 * e + 5] for _, k in step} for e in range(3)]
    assert all(len(k) == 40 for k in keys) and not keys[0] & keys[1]  # every image keyed anew each epoch
    assert sorted(i for step in items[:5] for i, _ in step) == list(range(40))
    ds = data.Images(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.zeros(40), 32)
    first, again = ds[items[0][0]], ds[items[0][0]]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[2], ds[items[5][0]][2])
    assert torch.equal(train.step_orders(args, 1, 2), train.step_orders(args, 1, 2))


def test_two_processes_draw_disjoint_shards_of_one_global_batch():
    args = argparse.Namespace(seed=0, batch_size=8, epochs=2)
    one = list(train.steps(36, args, 0, 0, 1))
    two = [list(train.steps(36, args, 0, rank, 2)) for rank in (0, 1)]
    assert len(one) == 8 and [a + b for a, b in zip(*two)] == one  # each its half, with the same keys
    assert all(len(a) == len(b) == 4 and not {i for i, _ in a} & {i for i, _ in b} for a, b in zip(*two))


def test_one_step_moves_the_weights_linearly_in_lambda(tmp_path):
    """One SGD step from the same weights: the update is lr (g_inv + lambda g_eq + wd w), so the weights after
    lambda = 0, 1, 2 lie on a line with equal, non-zero gaps."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    args = train.get_args(['--batch-size', '8', '--experts', '2', '--image-size', '32', '--out-dir', str(tmp_path),
                           '--epochs', '1'])
    run = {'rank': 0, 'device': torch.device('cpu'), 'norm': data.STL10_NORM, 'steps': 1,
           'stats': data.param_stats(square(32), n=1000)}
    ds = data.Images(images, torch.zeros(8), 32)
    after = []
    for args.eq_weight in (0.0, 1.0, 2.0):
        torch.manual_seed(0)
        model = STAR('resnet18', 'star', 2)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
        train.train_epoch(model, opt, iter(data.loader(ds, 0, train.steps(8, args, 0, 0, 1))), 0, args, run)
        after.append(model.heads.experts.w3.detach().clone())
    gap1, gap2 = after[1] - after[0], after[2] - after[1]
    assert gap1.abs().max() > 1e-6 and torch.allclose(gap1, gap2, atol=1e-3 * gap1.abs().max())


def test_learning_rate_follows_cosine_annealing_per_epoch():
    args = train.get_args(['--epochs', '7', '--batch-size', '512', '--lr', '0.05'])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05 * 512 / 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    for epoch in range(7):
        assert train.lr_at(args, epoch) == pytest.approx(opt.param_groups[0]['lr'], rel=1e-12)
        opt.step()
        sched.step()


def test_learning_rate_is_constant_within_an_epoch(stl, tmp_path, monkeypatch):
    root, _ = stl
    seen = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, 'step', lambda opt, *a: seen.append(opt.param_groups[0]['lr']) or step(opt))
    train.main(tiny_train_flags(root, str(tmp_path / 'run'), '--epochs', '2', '--eval-interval', '0')[1:])
    steps = len(seen) // 2
    assert steps == 5 and len(set(seen[:steps])) == 1 and len(set(seen[steps:])) == 1
    assert seen[0] == pytest.approx(0.03 * 16 / 256) and seen[-1] == pytest.approx(0.03 * 16 / 256 * 0.5)


def test_encoder_of_every_kth_epoch_is_kept(stl, tmp_path):
    root, _ = stl
    out = tmp_path / 'run'
    train.main(tiny_train_flags(root, str(out), '--epochs', '3', '--eval-interval', '0', '--save-every', '2')[1:])
    kept = sorted(f for f in os.listdir(out) if f.startswith('encoder') and f.endswith('.pt'))
    assert kept == ['encoder-2.pt', 'encoder.pt']


def test_non_finite_loss_stops_before_saving(stl, tmp_path):
    root, _ = stl
    out = str(tmp_path / 'run')
    assert run(*tiny_train_flags(root, out, '--epochs', '1', '--eval-interval', '0')).returncode == 0
    before = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    bad = run(*tiny_train_flags(root, out, '--epochs', '2', '--resume', '--lr', '1e12', '--eval-interval', '0'))
    assert bad.returncode == 1 and 'non-finite loss at epoch 2 step' in bad.stderr and 'L_inv' in bad.stderr
    assert 'ckpt.pt keeps epoch 1, nothing of this one: --resume with a lower --lr' in bad.stderr
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before


def snapshot(folder):
    """Every file below `folder` and its bytes, but .lock (the pid of the last train.py to hold the folder)."""
    return {os.path.join(d, f): open(os.path.join(d, f), 'rb').read() for d, _, fs in os.walk(folder) for f in fs
            if f != '.lock'}


def prepare_case(root, tmp_path, trained, setup):
    """A finished one-epoch run in tmp/run, a copy of the tiny STL-10 in tmp/stl, then the case's own change."""
    run_dir, stl_dir = tmp_path / 'run', tmp_path / 'stl'
    shutil.copytree(os.path.dirname(trained), run_dir)
    shutil.copytree(root, stl_dir)
    if setup == 'list':
        torch.save([1, 2], run_dir / 'ckpt.pt')
    elif setup == 'truncated':
        with open(stl_dir / 'stl10_binary' / 'test_X.bin', 'r+b') as f:
            f.truncate(5 * 3 * 96 * 96 + 7)
    elif setup == 'labels':
        with open(stl_dir / 'stl10_binary' / 'train_y.bin', 'r+b') as f:
            f.truncate(5)
    elif setup == 'missing':
        os.remove(stl_dir / 'stl10_binary' / 'test_X.bin')
    elif setup == 'foreign':  # weights named as another version of the code would name them
        ckpt = torch.load(run_dir / 'ckpt.pt', weights_only=True)
        ckpt['model'] = {k.replace('shift.', ''): v for k, v in ckpt['model'].items()}
        torch.save(ckpt, run_dir / 'ckpt.pt')
    elif setup == 'lock-dir':  # a folder where the run's lock file goes
        if os.path.exists(run_dir / '.lock'):
            os.remove(run_dir / '.lock')
        os.makedirs(run_dir / '.lock')
    elif setup == 'no-ckpt':  # deleted to save space
        os.remove(run_dir / 'ckpt.pt')
    elif setup == 'torchvision-jitter':  # trained by an earlier version of the code with --jitter torchvision
        ckpt = torch.load(run_dir / 'ckpt.pt', weights_only=True)
        ckpt['args']['jitter'] = 'torchvision'
        torch.save(ckpt, run_dir / 'ckpt.pt')
    return str(run_dir), str(stl_dir)


# (setup, command, the one line expected on stderr); every case exits 1 and leaves every file as it was
MISTAKES = [
    (None, ['train.py', '--epochs', '2'], 'holds a run (ckpt.pt, encoder.pt, log.jsonl, views.png)'),
    (None, ['train.py', '--epochs', '2', '--resume', '--seed', '1'], 'seed: 0 there, 1 here'),
    (None, ['train.py', '--epochs', '2', '--resume', '--batch-size', '8'], 'batch_size: 16 there, 8 here'),
    ('torchvision-jitter', ['train.py', '--epochs', '2', '--resume'], 'jitter: torchvision there, None here'),
    ('truncated', ['train.py', '--epochs', '2', '--overwrite'], 'test_X.bin and test_y.bin'),
    ('labels', ['train.py', '--epochs', '2', '--overwrite'], 'train_X.bin and train_y.bin'),
    ('no-ckpt', ['train.py', '--epochs', '2'], 'holds a run (encoder.pt, log.jsonl, views.png)'),
]

# (setup, command, the library's error that names the cause); every case changes no file
LIBRARY_SPEAKS = [
    ('list', ['train.py', '--epochs', '2', '--resume'], AttributeError, "'list' object has no attribute 'keys'"),
    ('missing', ['train.py', '--epochs', '2', '--overwrite'], FileNotFoundError, 'test_X.bin'),
    (None, ['eval_linear.py', '--dataset', 'stl10', '--results', __file__ + '/r.jsonl'], NotADirectoryError,
     'r.jsonl'),
    ('list', ['eval_linear.py', '--dataset', 'stl10'], AttributeError, "'list' object has no attribute 'get'"),
    ('foreign', ['train.py', '--epochs', '2', '--resume'], RuntimeError, 'Missing key.s. in state_dict: "shift'),
    ('no-ckpt', ['train.py', '--epochs', '2', '--resume'], FileNotFoundError, 'ckpt.pt'),
    ('foreign', ['eval_linear.py', '--dataset', 'stl10', '--analyze'], RuntimeError, 'Missing key.s. in state_dict'),
    (None, ['train.py', '--epochs', '2', '--overwrite', '--lr', '-1'], ValueError, 'Invalid learning rate: -1'),
    (None, ['train.py', '--epochs', '2', '--overwrite', '--wd', '-1'], ValueError, 'Invalid weight_decay value: -1'),
    (None, ['train.py', '--epochs', '2', '--overwrite', '--device', 'gpu'], RuntimeError, 'device string: gpu'),
    (None, ['train.py', '--epochs', '2', '--overwrite', '--workers', '-1'], ValueError,
     'num_workers option should be non-negative'),
    (None, ['train.py', '--out-dir', __file__ + '/out'], NotADirectoryError, 'test_star.py/out'),
    (None, ['train.py', '--epochs', '2', '--overwrite', '--device', 'cuda:7'], (AssertionError, RuntimeError),
     'CUDA|NVIDIA|cuda'),  # this machine has no GPU: torch names CUDA
    ('lock-dir', ['train.py', '--epochs', '2', '--resume'], IsADirectoryError, r'run/\.lock'),
]

BAD_VALUES = [  # (script, flags, the one line expected)
    (train, ['--eq-weight', 'nan'], '--eq-weight must be at least 0 (got nan)'),
    (train, ['--tau', '-0.2'], '--tau must be above 0'),
    (train, ['--tau', '0'], '--tau must be above 0'),
    (train, ['--eq-weight', 'inf'], '--eq-weight must be at least 0 (got inf)'),
    (train, ['--epochs', '0'], '--epochs must be at least 1'),
    (train, ['--save-every', '-1'], '--save-every must be at least 0'),
    (train, ['--experts', '0'], '--experts must be at least 1 (got 0)'),
    (train, ['--heads', 'simclr', '--experts', '8'], '--experts has no effect with --heads simclr: drop it'),
    (train, ['--heads', 'simclr', '--eq-weight', '1'], '--eq-weight has no effect with --heads simclr: drop it'),
    (train, ['--epochs', 'ten'], "argument --epochs: invalid int value: 'ten' (see --help)"),
    (train, ['--epoch', '10'], 'unrecognized arguments: --epoch 10'),
    (train, ['--image-size', '0'], '--image-size must be at least 1'),
    (train, ['--resume', '--overwrite'], 'argument --overwrite: not allowed with argument --resume'),
    (ev, ['--ckpt', 'c', '--dataset', 'stl10', '--few-shot', '0'], '--few-shot must be at least 1'),
    (ev, ['--ckpt', 'c', '--dataset', 'stl10', '--few-shot', '-1'], '--few-shot must be at least 1'),
    (ev, ['--ckpt', 'c', '--dataset', 'stl10', '--episodes', '0'], '--episodes must be at least 1'),
    (ev, ['--ckpt', 'c', '--dataset', 'caltech101', '--analyze'], 'caltech101 has no official ones'),
]


@pytest.mark.parametrize('script, flags, message', BAD_VALUES)
def test_bad_value_is_refused_up_front_in_one_line(script, flags, message):
    with pytest.raises(SystemExit) as e:
        script.get_args(flags)
    assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('setup, command, message', MISTAKES)
def test_everyday_mistake_ends_with_one_line_and_changes_nothing(stl, trained, tmp_path, setup, command, message):
    run_dir, stl_dir = prepare_case(stl[0], tmp_path, trained, setup)
    if command[0] == 'train.py':
        common = tiny_train_flags(stl_dir, run_dir, '--eval-interval', '0')
    else:
        common = ['eval_linear.py', '--ckpt', os.path.join(run_dir, 'ckpt.pt'), '--data-dir', stl_dir,
                  '--results', str(tmp_path / 'results.jsonl')]
    before = snapshot(run_dir) | snapshot(stl_dir)
    assert message in fails(train if command[0] == 'train.py' else ev, [*common[1:], *command[1:]])
    assert snapshot(run_dir) | snapshot(stl_dir) == before


@pytest.mark.parametrize('setup, command, error, words', LIBRARY_SPEAKS)
def test_where_the_librarys_error_names_the_cause_it_speaks_and_nothing_changes(stl, trained, tmp_path, setup,
                                                                              command, error, words):
    run_dir, stl_dir = prepare_case(stl[0], tmp_path, trained, setup)
    if command[0] == 'train.py':
        common = tiny_train_flags(stl_dir, run_dir, '--eval-interval', '0')[1:]
    else:
        common = ['--ckpt', os.path.join(run_dir, 'ckpt.pt'), '--data-dir', stl_dir, '--results',
                  str(tmp_path / 'results.jsonl')]
    before = snapshot(run_dir) | snapshot(stl_dir)
    with pytest.raises(error, match=words):
        (train if command[0] == 'train.py' else ev).main([*common, *command[1:]])
    assert snapshot(run_dir) | snapshot(stl_dir) == before


def test_overwrite_starts_afresh_and_resume_says_where_it_is(stl, trained, tmp_path):
    run_dir, stl_dir = prepare_case(stl[0], tmp_path, trained, None)
    flags = tiny_train_flags(stl_dir, run_dir, '--eval-interval', '0')
    finished = run(*flags, '--epochs', '1', '--resume')
    assert finished.returncode == 0 and 'the run is finished (1 of 1 epochs)' in finished.stdout
    resumed = run(*flags, '--epochs', '2', '--resume')
    assert 'resuming from epoch 1 of 2' in resumed.stdout and '--resume: epochs was 1, now 2' in resumed.stdout
    assert [e['epoch'] for e in read_log(run_dir)] == [1, 2]
    open(os.path.join(run_dir, 'encoder-2.pt'), 'w').close()  # as a longer run would have left
    fresh = run(*flags, '--epochs', '1', '--overwrite')
    assert fresh.returncode == 0 and 'starting a run of 1 epochs' in fresh.stdout
    removed = [line.split()[2] for line in fresh.stdout.splitlines() if line.startswith('--overwrite: removed')]
    files = ['ckpt.pt', 'encoder-2.pt', 'encoder.pt', 'log.jsonl', 'views.png']
    assert removed == [os.path.join(run_dir, f) for f in files]
    assert not os.path.exists(os.path.join(run_dir, 'encoder-2.pt'))
    assert [e['epoch'] for e in read_log(run_dir)] == [1]
    assert torch.load(os.path.join(run_dir, 'ckpt.pt'), weights_only=True)['epoch'] == 1


def test_ctrl_c_ends_the_run_and_it_resumes(stl, tmp_path):
    out = str(tmp_path / 'run')
    proc = subprocess.Popen([sys.executable, *tiny_train_flags(stl[0], out, '--epochs', '50', '--eval-interval', '0')],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal, even
    # when pytest itself runs in the background, where the shell ignores SIGINT and Python would inherit that
    while not os.path.exists(os.path.join(out, 'ckpt.pt')) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait() != 0 and proc.stderr.read().strip().endswith('KeyboardInterrupt')
    epochs = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['epoch']
    resumed = run(*tiny_train_flags(stl[0], out, '--epochs', str(epochs + 1), '--eval-interval', '0', '--resume'))
    assert resumed.returncode == 0 and f'resuming from epoch {epochs} of {epochs + 1}' in resumed.stdout


def test_ctrl_c_in_the_first_epoch_saves_nothing(stl, tmp_path):
    out = str(tmp_path / 'run')
    proc = subprocess.Popen([sys.executable, *tiny_train_flags(stl[0], out, '--epochs', '50', '--eval-interval', '0',
                                                                '--batch-size', '2')],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not os.path.exists(os.path.join(out, 'views.png')) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # 42 steps of 2 images take several seconds: still in the first epoch
    assert proc.wait() != 0 and proc.stderr.read().strip().endswith('KeyboardInterrupt')
    assert not os.path.exists(os.path.join(out, 'ckpt.pt'))


def poison_running_variance(out):
    """ckpt.pt with one BatchNorm running variance made infinite: training-mode steps do not read it, so the loss
    stays finite while the weights after the next epoch are not. Returns the file's bytes."""
    path = os.path.join(out, 'ckpt.pt')
    ckpt = torch.load(path, weights_only=True)
    ckpt['model']['encoder.bn1.running_var'][0] = float('inf')
    torch.save(ckpt, path)
    return open(path, 'rb').read()


def test_weights_that_are_not_finite_are_never_saved(stl, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    before = poison_running_variance(out)
    proc = run(*tiny_train_flags(stl[0], out, '--epochs', '2', '--eval-interval', '0', '--resume'))
    assert proc.returncode == 1 and 'the weights are not finite after epoch 2; ckpt.pt keeps epoch 1' in proc.stderr
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before


def test_non_finite_loss_names_the_term_that_blew_up(stl, tmp_path):
    proc = run(*tiny_train_flags(stl[0], str(tmp_path / 'run'), '--epochs', '1', '--eq-weight', '1e38'))
    terms = re.search(r'\(L_inv (\S+), L_eq (\S+), L inf\)', proc.stderr)  # L = L_inv + 1e38 L_eq
    assert proc.returncode == 1 and math.isfinite(float(terms[1])) and math.isfinite(float(terms[2]))
    assert '--lr or --eq-weight' in proc.stderr
    assert 'no epoch was saved: start afresh with --overwrite' in proc.stderr


@pytest.mark.parametrize('flags, message', [
    (['--batch-size', '1'], '--batch-size must be at least 2'),
    (['--experts', '0'], '--experts must be at least 1'),
    (['--image-size', '0'], '--image-size must be at least 1'),
    (['--heads', 'shared', '--experts', '8'], '--experts has no effect with --heads shared'),
    (['--dataset', 'folder', '--data-dir', '/nonexistent/images'], 'no image files'),
])
def test_bad_input_ends_with_one_clear_line(stl, tmp_path, flags, message):
    root, _ = stl
    argv = ['--data-dir', root, '--out-dir', str(tmp_path / 'run'), '--epochs', '1']  # flags given later win
    assert message in fails(train, [*argv, *[f.format(tmp=tmp_path) for f in flags]])  # one line, no traceback


def test_resume_refuses_another_model(stl, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    separate = [f for f in tiny_train_flags(stl[0], out, '--epochs', '2', '--resume', '--heads', 'separate')]
    separate[separate.index('--experts'):separate.index('--experts') + 2] = []  # fixed heads take no --experts
    other = run(*separate)
    assert other.returncode == 1 and 'heads: star there, separate here' in other.stderr


def test_resume_refuses_a_corrupt_checkpoint(stl, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    with open(os.path.join(out, 'ckpt.pt'), 'r+b') as f:
        f.truncate(1000)
    corrupt = run(*tiny_train_flags(stl[0], out, '--epochs', '2', '--resume'))
    assert corrupt.returncode == 1 and 'PytorchStreamReader failed reading zip archive' in corrupt.stderr
    assert os.path.getsize(os.path.join(out, 'ckpt.pt')) == 1000  # nothing written over it


# ---------------------------------------------------------------- distributed

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ddp_batch():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return *training_batch(images, seed=1), data.param_stats(square(32), n=1000)


def loss_and_grads(world, rank):
    """One training step's loss (averaged over processes) and this process's gradients, as train.py computes them."""
    batch, order, stats = ddp_batch()
    torch.manual_seed(0)
    model = STAR('resnet18', 'star', 4, bn=CPUSyncBatchNorm if world > 1 else None)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run = {'norm': data.STL10_NORM, 'stats': stats, 'device': torch.device('cpu')}
    share = [train.shard(t, rank, world) for t in batch]  # this process's share, as train.steps draws it
    l_inv, l_eq, _ = train.objective(net, share, order, run, FLAGS)
    (l_inv + l_eq).backward()
    terms = torch.stack([l_inv, l_eq]).detach()
    if world > 1:
        dist.all_reduce(terms)
    return terms / world, {k: v.grad for k, v in model.named_parameters()}


def ddp_worker(rank, world, port, path):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = loss_and_grads(world, rank)
    if rank == 0:
        torch.save(result, path)
    dist.destroy_process_group()


def test_two_process_gradients_equal_single_process(tmp_path):
    path = str(tmp_path / 'ddp.pt')
    mp.spawn(ddp_worker, args=(2, free_port(), path), nprocs=2)
    terms, grads = torch.load(path)
    ref_terms, ref_grads = loss_and_grads(1, 0)
    # float32 sums in another order, and batch moments as E[x^2] - E[x]^2: each tensor agrees to 1e-5 of its largest
    # gradient (seen: 2.4e-6 at most); 1e-7 absolute for psi's bias, whose gradient is zero in exact arithmetic
    # (a bias in front of BatchNorm) and is float noise of ~1e-8 in both runs
    assert torch.allclose(terms, ref_terms, rtol=1e-5)
    for k, g in ref_grads.items():
        assert (grads[k] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-7, k
    assert sum(g.abs().sum() for g in ref_grads.values()) > 1  # real gradients


# ---------------------------------------------------------------- evaluation

def blobs(n, d=8, classes=3, seed=0, shift=4.0):
    """Gaussian classes, linearly separable by a wide margin along the first `classes` axes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return torch.randn(n, d, generator=g) + shift * one_hot(y, d), y


def one_hot(y, d):
    return torch.nn.functional.one_hot(y, d).float()


def three_splits_of_blobs():
    return {s: blobs(300, seed=i) for i, s in enumerate(['train', 'val', 'test'])}


def test_probe_on_separable_classes_is_exact():
    assert ev.linear_probe(three_splits_of_blobs(), 'synthetic', False, 'cpu')['accuracy'] > 0.99


def test_probe_on_shuffled_labels_is_at_chance():
    feats = three_splits_of_blobs()
    g = torch.Generator().manual_seed(9)
    shuffled = {s: (f, y[torch.randperm(len(y), generator=g)]) for s, (f, y) in feats.items()}
    accuracy = ev.linear_probe(shuffled, 'synthetic', False, 'cpu')['accuracy']
    assert abs(accuracy - 1 / 3) < 0.1  # 3 classes, 300 test images


def test_regularisation_is_chosen_on_validation_not_test():
    # val follows train: weak regularisation wins there; test has its labels swapped: only w -> inf (a constant
    # prediction) scores there. Selection on val must keep a small w and report the poor test accuracy.
    xt, yt = blobs(200, classes=2, seed=0)
    xv, yv = blobs(200, classes=2, seed=1)
    xs, ys = blobs(200, classes=2, seed=2)
    result = ev.linear_probe({'train': (xt, yt), 'val': (xv, yv), 'test': (xs, 1 - ys)}, 'synthetic', False, 'cpu')
    assert result['w'] < 1 and result['val_accuracy'] > 0.99 and result['accuracy'] < 0.05


def test_probe_penalises_the_bias():
    """Constant features, one class: the bias alone fits. With 2 classes, bias (t, -t), the loss
    n log(1 + e^(-2t)) + 2 w t^2 is least where 2 w t = n sigmoid(-2t); an unpenalised bias would grow without end."""
    n, w = 10, 1.0
    x = torch.tensor([[0.0, 0.0, 1.0]]).expand(n, -1)  # the last feature is the bias's 1
    theta = ev.logistic_regression(x, torch.zeros(n, dtype=torch.long), 2, w)
    lo, hi = 0.0, 10.0
    for _ in range(60):
        t = (lo + hi) / 2
        lo, hi = (t, hi) if 2 * w * t < n * torch.sigmoid(torch.tensor(-2 * t)) else (lo, t)
    # float32 losses locate a flat minimum to about sqrt(eps) ~ 3e-4 (seen: 1.5e-4)
    assert theta[-1].tolist() == pytest.approx([t, -t], abs=1e-3) and theta[:-1].abs().max() < 1e-6


def test_both_probes_fit_a_bias(monkeypatch):
    """1-D features, all positive, class c about c + 1: without a bias each class's score is a line through 0, so one
    class wins every point (1/2 of two classes, 1/5 of five ways); with it the probe splits them."""
    def line(n, classes, seed):
        y = torch.arange(n) % classes
        return y[:, None] + 1 + 0.1 * torch.randn(n, 1, generator=torch.Generator().manual_seed(seed)), y
    monkeypatch.setattr(ev, 'WEIGHTS', torch.tensor([1e-2]))  # one w: the fit is under test, not the search
    feats = {s: line(200, 2, seed) for seed, s in enumerate(['train', 'val', 'test'])}
    assert ev.linear_probe(feats, 'synthetic', False, 'cpu')['accuracy'] > 0.95
    assert ev.few_shot({'all': line(400, 5, 0)}, 'line', 5, 40, 'cpu')['accuracy'] > 0.4


def test_validation_split_equals_random_split():
    f, y = torch.randn(5000, 2), torch.arange(5000)
    ref_train, ref_val = torch.utils.data.random_split(range(5000), [4500, 500],
                                                       generator=torch.Generator().manual_seed(50))
    (_, train_y), (_, val_y), _ = ev.probe_splits('stl10', {'train': (f, y), 'test': (f[:10], y[:10])})
    assert train_y.tolist() == list(ref_train) and val_y.tolist() == list(ref_val)


def test_one_vs_rest_solves_two_points_by_hand():
    """x = +1 (class 0), x = -1 (class 1): by symmetry b = 0 and theta solves theta = 2 sigmoid(-theta)."""
    theta = ev.one_vs_rest(torch.tensor([[[1.0, 1.0], [-1.0, 1.0]]]), torch.tensor([[0, 1]]), 2)[0]  # x; the bias's 1
    lo, hi = 0.0, 2.0
    for _ in range(60):
        t = (lo + hi) / 2
        lo, hi = (t, hi) if t < 2 * torch.sigmoid(torch.tensor(-t)) else (lo, t)
    assert theta.flatten().tolist() == pytest.approx([t, -t, 0.0, 0.0], abs=1e-3)  # float32, as above


def test_one_vs_rest_penalises_the_intercept():
    """All x = 0, three of class 0 and one of class 1: theta = 0 and class 0's intercept minimises b^2/2 +
    3 log(1 + e^-b) + log(1 + e^b), so b = 3 sigmoid(-b) - sigmoid(b), about 0.5; unpenalised it would be log 3."""
    theta = ev.one_vs_rest(torch.tensor([[[0.0, 1.0]] * 4]), torch.tensor([[0, 0, 0, 1]]), 2)[0]  # x = 0; the bias's 1
    lo, hi = 0.0, 2.0
    for _ in range(60):
        b = (lo + hi) / 2
        lo, hi = (b, hi) if b < 3 * torch.sigmoid(torch.tensor(-b)) - torch.sigmoid(torch.tensor(b)) else (lo, b)
    assert theta.flatten().tolist() == pytest.approx([0.0, 0.0, b, -b], abs=1e-3)
    assert abs(b - math.log(3)) > 0.5


def test_few_shot_queries_are_drawn_without_replacement_when_a_class_has_enough():
    labels = torch.tensor([0] * 21 + [1] * 30 + [2] * 30 + [3] * 30 + [4] * 8)  # 21 = k + 16 exactly
    support, query, _, _ = ev.episodes(labels, n=40, k=5, queries=16)
    for s, q in zip(support.view(40, 5, 5), query.view(40, 5, 16)):
        for s_c, q_c in zip(s, q):
            distinct = len(set(q_c.tolist()))
            assert distinct <= 3 if labels[s_c[0]] == 4 else distinct == 16  # class 4: 3 images after the support
            assert not set(q_c.tolist()) & set(s_c.tolist())


def test_few_shot_pool_is_train_and_test_except_fc100():
    train, test = blobs(40, d=4, classes=4, shift=6.0), blobs(40, d=4, classes=4, shift=6.0)
    feats = {'train': train, 'test': (test[0], test[1] + 4)}  # classes 0-3 in train, 4-7 in test
    assert ev.few_shot(feats, 'cub200', 1, 4, 'cpu')['pool'] == 80  # eight classes: five ways can be drawn
    with pytest.raises(SystemExit, match='5-way 1-shot needs 5 classes .* this data set has 4'):
        ev.few_shot(feats, 'fc100', 1, 4, 'cpu')  # the test split alone: four classes


def test_episodes_drop_small_classes_and_draw_short_queries_with_replacement():
    labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 30 + [3] * 30 + [4] * 8 + [5] * 5)  # 5: only k images
    support, query, _, _ = ev.episodes(labels, n=40, k=5, queries=16)
    assert not (labels[support] == 5).any() and not (labels[query] == 5).any()
    short = query[(labels[query] == 4).view(40, -1)].view(40, 16)  # the 3 images left after support, 16 draws
    assert all(len(set(q.tolist())) <= 3 for q in short)


def test_encoder_without_arguments_takes_its_pretraining_data(tmp_path, capsys):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / 'encoder.pt')
    _, size, norm, *_ = restore(str(tmp_path / 'encoder.pt'))
    assert size == 224 and norm == data.PRETRAIN['imagenet100'][1] and 'imagenet100' in capsys.readouterr().out
    torch.save({'backbone': torchvision.models.resnet50().state_dict(), 'image_size': 96, 'norm': data.STL10_NORM},
               tmp_path / 'recorded.pt')  # the layout that records them
    assert restore(str(tmp_path / 'recorded.pt'))[1:3] == (96, data.STL10_NORM)


def test_mean_per_class_accuracy():
    pred, y = torch.tensor([0, 0, 0, 0, 1, 0]), torch.tensor([0, 0, 0, 0, 1, 1])
    assert ev.accuracy(pred, y, False) == pytest.approx(5 / 6)
    assert ev.accuracy(pred, y, True) == pytest.approx((1 + 0.5) / 2)


def cca(x, y):
    """The analysis's CCA of paired rows, from their joint covariance."""
    return ev.cca(torch.cov(torch.cat([x, y], 1).T.double(), correction=0), x.shape[1])


def test_streamed_scores_equal_those_of_the_whole_split():
    """The analysis's means and CCA over batches of 16 test images equal those computed on all 40 at once."""
    torch.manual_seed(0)
    model, predictor = STAR('resnet18', 'star', 4).eval(), ev.Shift(512).eval()
    h0, h_v, a = torch.randn(40, 512), torch.randn(40, 16, 512), torch.randn(40, 16, 11)
    streamed = ev.score(zip(h0.split(16), h_v.split(16), a.split(16)), predictor, model)
    whole = ev.score([(h0, h_v, a)], predictor, model)
    assert streamed.keys() == whole.keys() and streamed['cca'] == pytest.approx(whole['cca'], abs=1e-6)
    assert all(streamed[k] == pytest.approx(whole[k], abs=1e-6) for k in whole)
    with torch.no_grad():
        z = model.heads(h0)
    assert whole['cca'] == pytest.approx(cca(z['z_inv'], z['z_eq']).mean().item(), abs=1e-6)


def test_cca_separates_identical_from_independent_embeddings():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, 6, generator=g), torch.randn(5000, 6, generator=g)
    assert cca(x, x).mean() > 0.999
    # independent: sample canonical correlations of n = 5000, p = q = 6 are of order sqrt(p / n) = 0.035
    assert cca(x, y).mean() < 0.07


def test_cca_is_invariant_to_invertible_linear_maps():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, 6, generator=g), torch.randn(5000, 6, generator=g)
    a = torch.randn(6, 6, generator=g) + 3 * torch.eye(6)  # invertible
    mixed = y + 0.8 * x
    assert abs(cca(x @ a, mixed @ a.T + 5).mean() - cca(x, mixed).mean()) < 1e-3 and cca(x, mixed).mean() > 0.5


def test_ranking_is_one_for_an_exact_predictor_and_chance_for_a_constant():
    z = torch.randn(5, 16, 8)
    exact = ev.equivariance(z, z)
    assert exact['mrr'] == pytest.approx(1) and exact['hit1'] == exact['hit5'] == 1 and exact['pre'] == 0
    constant = ev.equivariance(torch.ones(5, 16, 8), torch.ones(5, 16, 8))  # every view ties with the true one
    assert constant['mrr'] == pytest.approx(sum(1 / k for k in range(1, 17)) / 16)
    assert constant['hit1'] == pytest.approx(1 / 16) and constant['hit5'] == pytest.approx(5 / 16)
    pred = torch.tensor([[[1.0, 0.0]] * 3])
    target = torch.tensor([[[0.9, 0.1], [1.0, 0.3], [1.0, 0.0]]])  # for the first prediction the true view is 2nd
    ranked = ev.equivariance(pred[:, :1].expand(1, 3, 2), target)
    assert ranked['pre'] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) ** 0.5 / (0.82 ** 0.5) + 0.3 / 1.09 ** 0.5) / 3)
    assert ranked['mrr'] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3) and ranked['hit1'] == pytest.approx(1 / 3)


def test_frozen_predictor_learns_a_transformation_the_features_encode():
    g = torch.Generator().manual_seed(0)
    shift = torch.randn(11, 16, generator=g)
    h0, a = torch.randn(300, 16, generator=g), torch.randn(300, 8, 11, generator=g)
    h_v = h0[:, None] + a @ shift  # each view's features move with its parameters
    predictor = ev.fit_predictor(h0[:200], h_v[:200], a[:200], epochs=30)
    with torch.no_grad():
        pred = torch.stack([predictor(h0[200:], a_m) for a_m in a[200:].unbind(1)], 1)
    learned, chance = ev.equivariance(pred, h_v[200:]), sum(1 / k for k in range(1, 9)) / 8
    assert learned['mrr'] > 0.9 > chance + 0.5 and learned['pre'] < 0.3


def test_top_canonical_correlations_come_first():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(5000, 4, generator=g), torch.randn(5000, 4, generator=g)
    corr = cca(x, torch.cat([x[:, :1], noise[:, 1:]], 1))  # one shared direction
    assert corr[0] > 0.999 and corr[1:].max() < 0.07 and (corr[:-1] >= corr[1:]).all()


def test_episodes_keep_support_disjoint_from_query():
    labels = torch.arange(8).repeat_interleave(25)
    support, query, ys, yq = ev.episodes(labels, n=50, k=5, queries=16)
    assert support.shape == (50, 25) and query.shape == (50, 80)
    assert ys.tolist() == [c for c in range(5) for _ in range(5)] and yq.bincount().tolist() == [16] * 5
    for s, q in zip(support, query):
        assert not set(s.tolist()) & set(q.tolist())
        assert (labels[s].view(5, 5) == labels[s].view(5, 5)[:, :1]).all()  # each way is one class
        assert torch.equal(labels[q].view(5, 16)[:, 0], labels[s].view(5, 5)[:, 0])
        assert len(set(labels[s].tolist())) == 5


def test_few_shot_on_separable_classes_is_near_exact():
    result = ev.few_shot({'all': blobs(400, d=16, classes=8, shift=6.0)}, 'blobs', k=1, n=40, device='cpu')
    assert result['accuracy'] > 0.9 and 0 <= result['ci95'] < 0.05


def test_official_checkpoint_layout_loads(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    torch.save({'backbone': ref.state_dict(), 'epoch': 200}, tmp_path / 'official.pth')
    net, size, norm, *_ = restore(str(tmp_path / 'official.pth'))
    ref.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    assert size == 96 and norm == data.STL10_NORM and torch.equal(net.eval()(x), ref.eval()(x))
    torch.save({'backbone': {'conv1.weight': torch.zeros(1)}}, tmp_path / 'other.pth')
    with pytest.raises(RuntimeError, match='Missing key.s. in state_dict'):
        restore(str(tmp_path / 'other.pth'))


@pytest.fixture(scope='module')
def trained(stl, tmp_path_factory):
    root, _ = stl
    out = str(tmp_path_factory.mktemp('trained'))
    train.main(tiny_train_flags(root, out, '--epochs', '1', '--eval-interval', '0')[1:])
    return os.path.join(out, 'ckpt.pt')


def write_folder_dataset(root, splits, seed=0, size=40):
    """train/ and test/ of class folders: class c is images of brightness about 40 c."""
    g = torch.Generator().manual_seed(seed)
    for split, classes, n in splits:
        for c in classes:
            os.makedirs(root / split / f'class{c}', exist_ok=True)
            for i in range(n):
                img = (torch.rand(3, size, size, generator=g) * 60 + 40 * c).to(torch.uint8)
                TF.to_pil_image(img).save(root / split / f'class{c}' / f'{i}.png')


def test_folder_splits_share_the_training_class_list(tmp_path):
    write_folder_dataset(tmp_path, [('train', range(4), 2), ('test', [0, 2, 3], 2)])
    _, y = materialise(data.labelled('shapes', str(tmp_path), 'test', 32))
    assert y.tolist() == [0, 0, 2, 2, 3, 3]  # class1 is missing from test/, the later labels do not shift


def test_folder_images_outside_class_folders_are_refused(tmp_path):
    write_folder_dataset(tmp_path, [('train', range(2), 2), ('test', [0, 5], 1)])
    with pytest.raises(SystemExit, match=r'1 images of .*test are in no class folder of train/ \(e.g. .*class5'):
        data.labelled('shapes', str(tmp_path), 'test', 32)
    TF.to_pil_image(torch.zeros(3, 8, 8, dtype=torch.uint8)).save(tmp_path / 'train' / 'stray.png')
    with pytest.raises(SystemExit, match='stray.png'):
        data.labelled('shapes', str(tmp_path), 'train', 32)


@pytest.mark.parametrize('name', ['a/b', 'cifar11'])
def test_a_data_set_name_that_is_neither_known_nor_a_folder_is_refused(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=f'{tmp_path}/nonexistent/train'):  # an image folder's train/
        data.labelled(name, str(tmp_path / 'nonexistent'), 'train', 32)


def test_folder_without_class_folders_is_refused(tmp_path):
    os.makedirs(tmp_path / 'train')
    TF.to_pil_image(torch.zeros(3, 8, 8, dtype=torch.uint8)).save(tmp_path / 'train' / 'a.png')
    with pytest.raises(FileNotFoundError, match="Couldn't find any class folder in"):
        data.labelled('shapes', str(tmp_path), 'train', 32)


def test_images_of_any_mode_load_with_their_values(tmp_path):
    """16-bit grey (PIL would clip it to white), CMYK, palette, RGBA and .tif all come out as 8-bit RGB."""
    grey16 = Image.fromarray((torch.arange(64).view(8, 8) * 1000).numpy().astype('uint16'))
    grey16.save(tmp_path / 'a.png')
    Image.new('CMYK', (8, 8), (0, 255, 0, 0)).save(tmp_path / 'b.jpg')  # no magenta ink: green
    palette = Image.new('P', (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 20, 200] * 128)
    palette.save(tmp_path / 'c.png')
    Image.new('RGBA', (8, 8), (30, 60, 90, 128)).save(tmp_path / 'd.png')
    Image.new('RGB', (8, 8), (5, 250, 5)).save(tmp_path / 'e.tif')
    x, _ = materialise(data.Images(data.list_images(str(tmp_path)), torch.zeros(5), 8))
    assert len(x) == 5 and x[0, 0].max() == round(63000 * 255 / 65535) and x[0, 0, 0, 0] == 0
    assert x[1, :, 0, 0].tolist()[1] < 30 and x[1, 0, 0, 0] > 200  # CMYK (0, 255, 0, 0) is red + blue
    assert x[2, :, 0, 0].tolist() == [10, 20, 200]
    assert x[3, :, 0, 0].tolist() == [30, 60, 90] and x[4, :, 0, 0].tolist() == [5, 250, 5]


def test_sixteen_bit_images_keep_their_brightness(tmp_path):
    """Scaled by the bit depth, not by each image's own range: 250 of 65535 is near black, 65535 white."""
    for name, top in [('dim.png', 250), ('bright.png', 65535)]:
        Image.fromarray((torch.full((8, 8), top)).numpy().astype('uint16')).save(tmp_path / name)
    x, _ = materialise(data.Images(data.list_images(str(tmp_path)), torch.zeros(2), 8))
    assert x[0, 0, 0, 0] == 255 and x[1, 0, 0, 0] <= 1  # bright.png, dim.png in sorted order


def shapes_probe(trained, folder, outputs):
    """A tiny image-folder data set in `folder`, and the probe's arguments with results in `outputs`."""
    write_folder_dataset(folder, [('train', range(2), 2), ('test', range(2), 2)])
    return ev.get_args(['--ckpt', trained, '--dataset', 'shapes', '--data-dir', str(folder), '--device', 'cpu',
                        '--results', str(outputs / 'r.jsonl')])


def test_features_are_those_of_the_images_now_on_disk(trained, tmp_path):
    folder = tmp_path / 'shapes'
    args = shapes_probe(trained, folder, tmp_path)
    net, size, norm, *_ = restore(trained)
    first = ev.features(args, net, size, norm)
    TF.to_pil_image(torch.zeros(3, 40, 40, dtype=torch.uint8)).save(folder / 'test' / 'class0' / '0.png')
    changed = ev.features(args, net, size, norm)
    zero = data.encode(net, [(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1))], norm, 'cpu')[0][0]
    assert torch.allclose(changed['test'][0][0], zero, atol=1e-5) and not torch.allclose(first['test'][0][0], zero)
    assert torch.equal(changed['test'][0][1:], first['test'][0][1:])


def test_a_linked_class_folder_is_a_class_with_its_images(tmp_path):
    write_folder_dataset(tmp_path / 'elsewhere', [('train', range(1), 3)])
    write_folder_dataset(tmp_path / 'data', [('train', range(1), 2)])
    os.symlink(tmp_path / 'elsewhere' / 'train' / 'class0', tmp_path / 'data' / 'train' / 'linked')
    classes, _ = find_classes(str(tmp_path / 'data' / 'train'))
    _, y = data.image_folder(str(tmp_path / 'data' / 'train'), classes)
    assert classes == ['class0', 'linked']
    assert y.tolist() == [0, 0, 1, 1, 1]


def test_a_validation_split_is_held_out_from_the_smallest_training_set():
    f, y = torch.randn(5, 3), torch.arange(5)  # five classes of one image
    train_, val, _ = ev.probe_splits('tiny', {'train': (f, y), 'test': (f, y)})
    assert len(val[1]) == 1 and len(train_[1]) == 4
    with pytest.raises(SystemExit, match='a linear probe needs two classes or more'):
        ev.linear_probe({'train': (f[:1], y[:1]), 'test': (f, y)}, 'tiny', False, 'cpu')


def test_checkpoint_layouts_that_are_not_read_are_named(tmp_path):
    torch.save(torchvision.models.resnet18(), tmp_path / 'whole.pt')
    torch.save({'state_dict': torchvision.models.resnet18().state_dict()}, tmp_path / 'wrapped.pt')
    random = bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)).tolist())
    (tmp_path / 'random.pt').write_bytes(random)
    (tmp_path / 'pickle.pt').write_bytes(b'\x80\x02' + random)  # a pickle's first bytes, then noise
    for name in ['whole.pt', 'random.pt', 'pickle.pt']:  # torch's error would advise weights_only=False
        with pytest.raises(SystemExit) as e:
            restore(str(tmp_path / name))
        assert f'{name} holds no weights torch reads safely' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(RuntimeError, match='Unexpected key.s. in state_dict: "state_dict"'):  # torch names the cause
        restore(str(tmp_path / 'wrapped.pt'))


@pytest.mark.parametrize('content, message', [
    (b'', 'r.jsonl holds no results'),
    (b'\xff\xfe\n{"task": "linear"}\n', 'skipped 2 unreadable lines of'),
])
def test_summary_of_nothing_readable_says_so(tmp_path, content, message):
    path = tmp_path / 'r.jsonl'
    path.write_bytes(content)
    assert message in ev.summary(str(path)) and '\n' not in ev.summary(str(path))
    os.makedirs(tmp_path / 'folder')  # a folder given as --results: Python names it
    with pytest.raises(IsADirectoryError, match='folder'):
        ev.summary(str(tmp_path / 'folder'))


def test_summary_keeps_a_column_per_data_set_and_metric(tmp_path):
    lines = [{'ckpt_sha256': 'h', 'name': 'run h', 'task': 'linear', 'dataset': 'pets', 'metric': metric,
              'accuracy': value} for metric, value in [('top1', 0.5), ('mean-per-class', 0.4)]]
    (tmp_path / 'r.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
    table = ev.summary(str(tmp_path / 'r.jsonl')).splitlines()
    assert table[0].split()[1:3] == ['pets/mpc', 'pets/top1'] and table[1].split()[2:4] == ['40.00', '50.00']


def test_summary_keys_rows_by_checkpoint_hash(stl, trained, tmp_path, monkeypatch):
    common = ['--results', str(tmp_path / 'r.jsonl'), '--data-dir', stl[0]]
    os.symlink(os.path.dirname(trained), tmp_path / 'link')
    monkeypatch.chdir(HERE)
    for ckpt in [trained, os.path.relpath(trained, HERE), str(tmp_path / 'link' / 'ckpt.pt')]:
        ev.main(['--ckpt', ckpt, '--dataset', 'stl10', *common])
    record = read_jsonl(tmp_path / 'r.jsonl')[0]
    with open(tmp_path / 'r.jsonl', 'a') as f:
        f.write('{"partial": \n')
    assert record['ckpt'] == trained and record['image_size'] == 32 and record['splits']['test'] == 260
    assert record['args']['dataset'] == 'stl10' and record['norm'] == [list(v) for v in data.STL10_NORM]
    lines = run('eval_linear.py', '--summary', *common[:2]).stdout.splitlines()
    assert len(lines) == 5 and lines[-1] == f'skipped 1 unreadable lines of {tmp_path / "r.jsonl"}'


def test_summary_ranks_over_the_data_sets_every_row_has():
    rows = {'a': {'x': 50.0, 'y': 10.0}, 'b': {'x': 40.0, 'y': 20.0, 'z': 99.0}}
    text = ev.table('linear', rows).splitlines()
    assert text[-1].startswith('mean and avg rank over x, y (top1: top-1 accuracy, mpc: mean per-class')
    assert rows['a']['mean'] == rows['b']['mean'] == 30.0 and rows['a']['avg rank'] == rows['b']['avg rank'] == 1.5
    assert text[1].split()[-3] == '-'  # a has no z


def test_analysis_columns_keep_their_order_whatever_the_first_row_holds():
    rows = {'encoder.pt': {'frozen_mrr': 0.5, 'frozen_hit1': 0.4},
            'ckpt.pt': {'cca': 0.1, 'frozen_mrr': 0.6, 'mrr': 0.7}}
    assert ev.table('analysis', rows).splitlines()[0].split() == ['analysis', 'cca', 'mrr', 'frozen_mrr', 'frozen_hit1']


def test_eval_commands_write_results_the_summary_reads(stl, trained, tmp_path, capsys):
    root, _ = stl
    folder = tmp_path / 'shapes'
    g = torch.Generator().manual_seed(0)
    for split, n in [('train', 4), ('test', 18)]:
        for c in range(5):
            os.makedirs(folder / split / f'class{c}')
            for i in range(n):
                img = (torch.rand(3, 40, 40, generator=g) * 60 + 40 * c).to(torch.uint8)
                TF.to_pil_image(img).save(folder / split / f'class{c}' / f'{i}.png')
    common = ['--results', str(tmp_path / 'results.jsonl')]
    for flags in [['--dataset', 'stl10', '--data-dir', root], ['--dataset', 'shapes', '--data-dir', str(folder)],
                  ['--dataset', 'shapes', '--data-dir', str(folder), '--few-shot', '1', '--episodes', '20'],
                  ['--dataset', 'stl10', '--data-dir', root, '--analyze']]:
        ev.main(['--ckpt', trained, *flags, *common])
    results = read_jsonl(tmp_path / 'results.jsonl')
    assert [r['task'] for r in results] == ['linear', 'linear', '5-way 1-shot', 'analysis']
    assert results[1]['accuracy'] > 0.9  # brightness separates the five classes
    analysis = results[3]
    assert analysis['views'] == 16 and 1 / 16 <= analysis['mrr'] <= 1 and analysis['hit1'] <= analysis['mrr']
    assert analysis['hit1'] <= analysis['hit5'] and 1 / 16 <= analysis['frozen_mrr'] <= 1
    assert 0 <= analysis['cca'] <= 1 and abs(sum(analysis['routing_eq']) - 1) < 1e-4
    assert len(analysis['routing_inv']) == 4 and analysis['sample'] == 20  # 4 experts, STL-10's 20 training images
    assert os.path.basename(analysis['routing_png']) == picture_name(analysis, 'stl10', stl[0])
    model = restore(trained)[3].eval()  # each router's mean weight over the test originals, computed here
    x0, _ = materialise(data.labelled('stl10', root, 'test', 32, TF.InterpolationMode.BILINEAR))
    with torch.no_grad():
        e = model.heads(model.encoder(TF.normalize(x0.float() / 255, *data.STL10_NORM)))
    assert analysis['routing_inv'] == pytest.approx(e['s_inv'].mean(0).tolist(), abs=1e-5)
    assert analysis['routing_eq'] == pytest.approx(e['s_eq'].mean(0).tolist(), abs=1e-5)
    capsys.readouterr()
    ev.main(['--summary', *common])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ['linear', 'shapes/top1', 'stl10/top1', 'mean', 'avg', 'rank']
    name = f'{os.path.basename(os.path.dirname(trained))}/ckpt.pt {results[0]["ckpt_sha256"][:8]}'
    assert table[1].startswith(name) and table[1].count(name) == 1
    row = table[1][len(name):].split()
    assert float(row[2]) == pytest.approx((float(row[0]) + float(row[1])) / 2, abs=0.01) and float(row[3]) == 1
    assert table[2].startswith('mean and avg rank over shapes/top1, stl10/top1 (top1: top-1 accuracy')
    assert table[4].split() == ['5-way', '1-shot', 'shapes/top1'] and table[7].startswith('analysis')
    assert table[7].split() == ['analysis', *ev.ANALYSIS_COLUMNS] and table[8].startswith(f'{name} on stl10')
    assert [float(v) for v in table[8].split()[-len(ev.ANALYSIS_COLUMNS):]] == pytest.approx(
        [analysis[c] for c in ev.ANALYSIS_COLUMNS], abs=5.01e-4)  # printed to 3 decimals


def test_analysis_of_an_encoder_without_heads_measures_its_frozen_features(stl, trained, tmp_path):
    root, _ = stl
    results = tmp_path / 'results.jsonl'
    ev.main(['--ckpt', os.path.join(os.path.dirname(trained), 'encoder.pt'), '--dataset', 'stl10', '--data-dir', root,
             '--analyze', '--results', str(results)])
    r = read_jsonl(results)[0]
    assert 'cca' not in r and 'mrr' not in r and 'routing_inv' not in r  # no heads: frozen metrics only
    assert 'routing_png' not in r and not [f for f in os.listdir(tmp_path) if f.startswith('routing')]
    assert r['image_size'] == 32 and r['norm'] == [list(v) for v in data.STL10_NORM]  # recorded in encoder.pt
    assert 1 / 16 <= r['frozen_mrr'] <= 1 and r['frozen_hit1'] <= r['frozen_hit5'] and r['frozen_pre'] > 0


def test_missing_transfer_data_set_offline_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError('no network')
    monkeypatch.setitem(data.TORCHVISION, 'cifar10', (offline, data.TORCHVISION['cifar10'][1]))
    with pytest.raises(SystemExit) as e:
        data.labelled('cifar10', str(tmp_path), 'train', 96)
    assert 'OSError: no network; place the files where torchvision.datasets.offline(root=' in str(e.value)
    assert '(cifar10, train)' in str(e.value) and '\n' not in str(e.value)


def test_torchvision_layout_probe_uses_official_splits(trained, tmp_path):
    """A tiny DTD in torchvision's layout (dtd/dtd/images, dtd/dtd/labels/{split}1.txt): the real loading path."""
    base = tmp_path / 'dtd' / 'dtd'
    g = torch.Generator().manual_seed(0)
    os.makedirs(base / 'labels')
    for split, n in [('train', 6), ('val', 3), ('test', 4)]:
        lines = []
        for c, name in enumerate(['banded', 'dotted', 'woven']):
            os.makedirs(base / 'images' / name, exist_ok=True)
            for i in range(n):
                img = (torch.rand(3, 50, 70, generator=g) * 50 + 90 * c).to(torch.uint8)
                TF.to_pil_image(img).save(base / 'images' / name / f'{split}{i}.jpg')
                lines.append(f'{name}/{split}{i}.jpg\n')
        (base / 'labels' / f'{split}1.txt').write_text(''.join(lines))
    proc = run('eval_linear.py', '--ckpt', trained, '--dataset', 'dtd', '--data-dir', str(tmp_path),
               '--results', str(tmp_path / 'r.jsonl'))
    assert proc.returncode == 0, proc.stderr
    result = read_jsonl(tmp_path / 'r.jsonl')[0]
    assert result['splits'] == {'train': 18, 'val': 9, 'test': 12}  # the official splits, none held out
    assert result['metric'] == 'top1' and result['accuracy'] == 1.0  # brightness separates the three classes


def test_torchrun_two_processes_trains_like_one(stl, tmp_path):
    """train.py under torchrun: sharding, synchronised BatchNorm, gathered negatives and rank-0 writing give the
    run of one process. A small learning rate keeps the tiny-batch training from amplifying float noise (at the
    default rate even one process differs by ~5e-3 in BN statistics between 1 and 2 threads)."""
    root, _ = stl
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    flags = ['--epochs', '1', '--eval-interval', '0', '--lr', '0.001']
    assert run(*tiny_train_flags(root, one, *flags)).returncode == 0
    torchrun = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                '--master_port', str(free_port())]
    proc = subprocess.run([*torchrun, *tiny_train_flags(root, two, *flags)], cwd=HERE, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    a = torch.load(os.path.join(one, 'ckpt.pt'), weights_only=True)['model']
    b = torch.load(os.path.join(two, 'ckpt.pt'), weights_only=True)['model']
    torch.manual_seed(0)
    init = STAR('resnet18', 'star', 4).state_dict()
    moved = max((a[k] - init[k]).abs().max() for k in a if a[k].is_floating_point())
    # weights after 5 steps on the same global batches (seen: 3.4e-6 of 1.1); BN running variances relative to
    # their value (seen: 3.4e-5), both from float sums taken in another order across two processes
    worst = max((a[k] - b[k]).abs().max() for k in a if a[k].is_floating_point() and 'running' not in k)
    assert worst < 1e-4 * moved, (moved, worst)
    assert max(((a[k] - b[k]).abs() / a[k].abs()).max() for k in a if 'running_var' in k) < 3e-4
    assert [e['epoch'] for e in read_log(two)] == [1]


def test_pretraining_on_an_image_folder(tmp_path):
    """--dataset folder: images of any size, cropped from the files as they are read; ImageNet's normalisation."""
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        img = (torch.rand(3, 40 + i, 50, generator=g) * 255).to(torch.uint8)
        TF.to_pil_image(img).save(tmp_path / f'{i}.png')
    inside = run('train.py', '--dataset', 'folder', '--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'run'))
    assert inside.returncode == 1 and 'inside --data-dir' in inside.stderr and len(os.listdir(tmp_path)) == 20
    out = str(tmp_path.parent / f'{tmp_path.name}-run')
    proc = run('train.py', '--dataset', 'folder', '--data-dir', str(tmp_path), '--out-dir', out, '--epochs', '1',
               '--batch-size', '8', '--experts', '2', '--image-size', '32')
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert [list(v) for v in ckpt['norm']] == [list(v) for v in data.IMAGENET_NORM]
    log = read_log(out)
    assert len(log) == 1 and 'knn_top1' not in log[0]  # no labelled splits, no monitor


# ---------------------------------------------------------------- size

def code_lines(source):
    """Physical lines holding a token that is not a comment or layout; docstrings (the first string statement of a
    module, class or function) do not count, every line of a multi-line statement does."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, 'body', None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in layout:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstrings)


def test_code_line_counter_counts_by_hand():
    source = '''"""Module docstring,
over two lines."""
import os  # a comment


def f(x):
    """Docstring."""
    # a comment line
    y = max(x,
            2)

    text = """not a docstring
    but a string of two lines"""
    return y, text
'''
    assert code_lines(source) == 7  # import, def, the two lines of max, the two of text, return


def test_implementation_is_under_a_thousand_code_lines_of_at_most_120_characters():
    counts, long_lines = {}, []
    for name in ['model.py', 'data.py', 'losses.py', 'train.py', 'eval_linear.py']:
        with open(os.path.join(HERE, name)) as f:
            source = f.read()
        counts[name] = code_lines(source)
        long_lines += [f'{name}:{i}' for i, line in enumerate(source.splitlines(), 1) if len(line) > 120]
    assert sum(counts.values()) < 1000, f'{sum(counts.values())} code lines: {counts}'
    assert not long_lines, f'lines over 120 characters: {long_lines}'


# ---------------------------------------------------------------- the authors' splits and sample orders

def test_split_files_are_augselfs():
    with open(os.path.join(HERE, 'splits', 'caltech101.json')) as f:
        caltech = json.load(f)
    with open(os.path.join(HERE, 'splits', 'sun397.json')) as f:
        sun = json.load(f)
    assert [len(caltech[s]) for s in ('train', 'val', 'test')] == [2525, 505, 5647]
    assert sorted(caltech['train'] + caltech['val'] + caltech['test']) == list(range(8677))
    assert [len(sun[s]) for s in ('train', 'val')] == [15880, 3970]
    assert sorted(sun['train'] + sun['val']) == list(range(19850))


def test_index_split_files_pick_their_rows(tmp_path, monkeypatch):
    (tmp_path / 'caltech101.json').write_text(json.dumps({'train': [4, 0], 'val': [2], 'test': [1, 3]}))
    (tmp_path / 'sun397.json').write_text(json.dumps({'train': [2, 0], 'val': [1]}))
    monkeypatch.setattr(data, 'SPLITS', str(tmp_path))
    f, y = torch.arange(5.0)[:, None], torch.arange(5) + 10
    train_, val, test = ev.probe_splits('caltech101', {'all': (f, y)})
    assert train_[1].tolist() == [14, 10] and val[1].tolist() == [12] and test[1].tolist() == [11, 13]
    train_, val, test = ev.probe_splits('sun397', {'train': (f[:3], y[:3]), 'test': (f[3:], y[3:])})
    assert train_[1].tolist() == [12, 10] and val[1].tolist() == [11] and test[1].tolist() == [13, 14]
    with pytest.raises(SystemExit) as e:
        ev.probe_splits('caltech101', {'all': (f[:3], y[:3])})
    assert 'incomplete' in str(e.value) and '\n' not in str(e.value)


def write_image(path, value, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, (value, value, value)).save(path)


def test_sun397_reads_partition_one_labelled_by_class_names(tmp_path):
    base = tmp_path / 'SUN397'
    (base / 'ClassName.txt').parent.mkdir()
    (base / 'ClassName.txt').write_text('/a/abbey\n/b/beach\n/b/beach_house\n')
    lines = ['/b/beach_house/sun_c.jpg', '/a/abbey/sun_a.jpg', '/b/beach/sun_b.jpg']
    for value, line in enumerate(lines):
        write_image(str(base) + line, 10 * value)
    (base / 'Training_01.txt').write_text('\n'.join(lines) + '\n')
    (base / 'Testing_01.txt').write_text(lines[1] + '\n')
    x, y = materialise(data.labelled('sun397', str(tmp_path), 'train', 32))
    assert y.tolist() == [2, 0, 1] and x[:, 0, 0, 0].tolist() == [0, 10, 20]  # the lines' order
    assert materialise(data.labelled('sun397', str(tmp_path), 'test', 32))[1].tolist() == [0]


def test_sun397_without_partition_files_offline_names_them(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError('no network')
    write_image(str(tmp_path / 'SUN397' / 'a' / 'abbey' / 'sun_a.jpg'), 0)
    monkeypatch.setattr(torchvision.datasets.utils, 'download_and_extract_archive', offline)
    with pytest.raises(SystemExit) as e:
        data.labelled('sun397', str(tmp_path), 'train', 32)
    assert 'OSError: no network' in str(e.value) and 'Partitions.zip' in str(e.value) and '\n' not in str(e.value)


def test_food101_samples_follow_augselfs_order(trained, tmp_path):
    """torchvision lists meta/train.json's classes in the file's order; AugSelf in meta/classes.txt's (sorted)."""
    base = tmp_path / 'food-101'
    meta = {'pizza': ['pizza/1', 'pizza/0'], 'apple_pie': ['apple_pie/2', 'apple_pie/1']}
    os.makedirs(base / 'meta')
    (base / 'meta' / 'classes.txt').write_text('apple_pie\npizza\n')
    for split in ('train', 'test'):
        (base / 'meta' / f'{split}.json').write_text(json.dumps(meta))
    for value, path in enumerate(['pizza/1', 'pizza/0', 'apple_pie/2', 'apple_pie/1']):
        write_image(str(base / 'images' / f'{path}.jpg'), 50 * value)
    x, y = materialise(data.labelled('food101', str(tmp_path), 'train', 32))  # torchvision's order
    assert y.tolist() == [1, 1, 0, 0] and x[:, 0, 0, 0].tolist() == [0, 50, 100, 150]
    args = ev.get_args(['--ckpt', trained, '--dataset', 'food101', '--data-dir', str(tmp_path), '--device', 'cpu',
                        '--results', str(tmp_path / 'r.jsonl')])
    net, size, norm, *_ = restore(trained)
    f, y = ev.features(args, net, size, norm)['train']  # encoded, then put in AugSelf's order
    assert y.tolist() == [0, 0, 1, 1]
    assert torch.allclose(f, data.encode(net, [(x[[2, 3, 0, 1]], y)], norm, 'cpu')[0], atol=1e-5)


def test_image_folder_order_is_imagefolders(tmp_path):
    """Class by class in sorted order, as torchvision's ImageFolder (the authors' Cars and MIT-67): a class whose
    name extends another's ('Audi A4 2012' after 'Audi A4') does not interleave with it as sorted paths would."""
    for value, path in enumerate(['Audi A4 2012/b.jpg', 'Audi A4/z.jpg', 'Audi A4/a.jpg', 'Audi A4 2012/a.jpg']):
        write_image(str(tmp_path / path), 40 * value)
    classes, _ = find_classes(str(tmp_path))
    paths, y = data.image_folder(str(tmp_path), classes)
    x, _ = materialise(data.Images(paths, y, 32))
    reference = torchvision.datasets.ImageFolder(str(tmp_path))
    assert classes == reference.classes and y.tolist() == reference.targets
    assert paths == [p for p, _ in reference.samples]
    assert x[:, 0, 0, 0].tolist() == [TF.pil_to_tensor(reference[i][0])[0, 0, 0].item() for i in range(4)]


def test_pretraining_on_a_folder_with_splits_takes_train_only(tmp_path):
    write_folder_dataset(tmp_path / 'data', [('train', range(2), 5), ('test', range(2), 4)])
    images = data.image_folder(str(tmp_path / 'data' / 'train'), ['class0', 'class1'])[0]
    proc = run('train.py', '--dataset', 'folder', '--data-dir', str(tmp_path / 'data'), '--out-dir',
               str(tmp_path / 'run'), '--epochs', '1', '--batch-size', '4', '--experts', '2', '--image-size', '32')
    assert proc.returncode == 0, proc.stderr
    assert f'pretraining on {tmp_path / "data" / "train"} only' in proc.stdout
    assert 'starting a run of 1 epochs: folder, 10 images' in proc.stdout and len(images) == 10


def test_pets_samples_follow_the_annotation_files_order_as_augself_reads_them(tmp_path):
    """AugSelf lists annotations/SPLIT.txt line by line, label = class id - 1; torchvision's reader does the same."""
    base = tmp_path / 'oxford-iiit-pet'
    lines = ['pug_2 25 2 1', 'Abyssinian_1 1 1 1', 'pug_1 25 2 1']
    os.makedirs(base / 'annotations')
    for split in ('trainval', 'test'):
        (base / 'annotations' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    for value, line in enumerate(lines):
        write_image(str(base / 'images' / f'{line.split()[0]}.jpg'), 100 * value)
    x, y = materialise(data.labelled('pets', str(tmp_path), 'train', 32))
    assert y.tolist() == [24, 0, 24] and (x[:, 0, 0, 0].float() - torch.tensor([0, 100, 200])).abs().max() < 3


# ---------------------------------------------------------------- ImageNet-100 and other folders read by workers

def test_imagenet100_keeps_the_hundred_classes_of_its_list_in_the_lists_order(tmp_path):
    with open(os.path.join(HERE, 'splits', 'imagenet100.txt')) as f:
        classes = f.read().split()
    assert classes != sorted(classes)  # so the list's order and ImageFolder's differ
    for split in ('train', 'val'):
        for c in sorted(classes + ['n99999999']):  # 101 class folders: one not of ImageNet-100
            for name in ('b.JPEG', 'a.JPEG'):
                write_image(str(tmp_path / split / c / name), 7)
    paths, labels = data.imagenet100(str(tmp_path), 'train')
    folder = torchvision.datasets.ImageFolder(str(tmp_path / 'train'))  # the authors' ImageNet100, filtered
    kept = [(p, folder.classes[k]) for p, k in folder.samples if folder.classes[k] in classes]
    assert len(paths) == 200 and paths == [p for p, _ in kept]
    assert labels.tolist() == [classes.index(c) for _, c in kept]  # labelled by the list's order
    x, y = materialise(data.labelled('imagenet100', str(tmp_path), 'test', 32))  # val/ is the probe's test split
    assert len(x) == 200 and y.tolist() == [classes.index(c) for c in sorted(classes) for _ in range(2)]
    os.rename(tmp_path / 'train' / classes[5], tmp_path / 'elsewhere')
    with pytest.raises(SystemExit, match=f'lacks 1 of the ImageNet-100 class folders \\({classes[5]}'):
        data.imagenet100(str(tmp_path), 'train')


def test_nothing_decodes_the_data_set_up_front(tmp_path, monkeypatch):
    write_folder_dataset(tmp_path / 'data', [('train', range(3), 4)], size=50)

    def decode(*a, **k):
        raise AssertionError('decoded')
    monkeypatch.setattr(Image.Image, 'load', decode)
    args = train.get_args(['--dataset', 'folder', '--data-dir', str(tmp_path / 'data'), '--out-dir', str(tmp_path)])
    images, monitor = train.load_data(args)  # lists the files
    sizes = data.image_sizes(images)  # and reads image sizes from their headers only
    assert len(images) == 12 and sizes.tolist() == [[50, 50]] * 12 and monitor is None
    with pytest.raises(AssertionError, match='decoded'):
        images[0]  # a file is decoded only when an item is read


def test_folder_run_resumed_equals_uninterrupted_run_with_any_number_of_workers(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        img = (torch.rand(3, 30 + 3 * i, 60 - i, generator=g) * 255).to(torch.uint8)
        TF.to_pil_image(img).save(tmp_path / f'{i}.jpg')
    flags = ['--dataset', 'folder', '--data-dir', str(tmp_path), '--batch-size', '8', '--experts', '2',
             '--image-size', '32']
    whole, halves = str(tmp_path.parent / 'whole'), str(tmp_path.parent / 'halves')
    assert run('train.py', *flags, '--out-dir', whole, '--epochs', '2', '--workers', '2').returncode == 0
    assert run('train.py', *flags, '--out-dir', halves, '--epochs', '1', '--workers', '0').returncode == 0
    resumed = run('train.py', *flags, '--out-dir', halves, '--epochs', '2', '--workers', '1', '--resume')
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(os.path.join(whole, 'ckpt.pt'), weights_only=True)['model']
    b = torch.load(os.path.join(halves, 'ckpt.pt'), weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- behaviours pinned through a run's own path

def test_a_crop_box_can_start_anywhere_randomresizedcrop_allows():
    image = torch.randint(0, 256, (1, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = data.Images(image, torch.zeros(1), 32)
    boxes = torch.cat([ds[(0, key)][2][:, :4] for key in range(1500)])  # top, left, height, width
    top, left, h, w = boxes.T
    assert (top == 0).any() and (left == 0).any()
    assert ((top == 12 - h) & (h < 12)).any() and ((left == 12 - w) & (w < 12)).any()  # the last row and column
    assert (top <= 12 - h).all() and (left <= 12 - w).all()


def epoch_items(ds, args, epochs):
    """{epoch: [(image, item) of every step]} as a run's loader yields them, with the steps that keyed them."""
    keys, out = list(train.steps(len(ds), args, 0, 0, 1)), {}
    batches = data.loader(ds, 0, train.steps(len(ds), args, 0, 0, 1))
    per_epoch = len(ds) // args.batch_size
    for s, (step, (x0, views, p)) in enumerate(zip(keys, batches)):
        out.setdefault(s // per_epoch, []).extend((i, (x0[j], views[j], p[j])) for j, (i, _) in enumerate(step))
    assert sorted(out) == list(range(epochs))
    return out


def test_the_same_image_gets_other_views_in_another_epoch():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    args = argparse.Namespace(seed=0, epochs=2, batch_size=4)
    items = epoch_items(data.Images(images, torch.zeros(8), 32), args, 2)
    first, second = (dict(items[e])[3] for e in (0, 1))  # image 3's item in each epoch
    assert torch.equal(first[0], second[0])  # the same x0
    assert not torch.equal(first[1], second[1]) and not torch.equal(first[2], second[2])  # other views, other boxes


def test_every_epoch_draws_another_sample_order():
    args = argparse.Namespace(seed=0, epochs=4, batch_size=4)
    orders = [[i for step in list(train.steps(32, args, 0, 0, 1))[8 * e:8 * e + 8] for i, _ in step] for e in range(4)]
    assert all(sorted(o) == list(range(32)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4


def test_every_epoch_draws_other_colour_orders():
    args = argparse.Namespace(seed=0)
    for epoch in (1, 2):
        assert any(not torch.equal(train.step_orders(args, 0, s), train.step_orders(args, epoch, s)) for s in range(4))
    assert torch.equal(train.step_orders(args, 1, 3), train.step_orders(args, 1, 3))  # yet a function of the step


def test_a_data_set_one_image_short_of_its_index_file_is_refused():
    with open(os.path.join(data.SPLITS, 'caltech101.json')) as f:
        needed = max(max(i) for i in json.load(f).values()) + 1
    f, y = torch.zeros(needed, 1), torch.arange(needed)
    train_split, _, test_split = ev.probe_splits('caltech101', {'all': (f, y)})  # exactly enough: read
    assert len(train_split[1]) == 2525 and len(test_split[1]) == 5647
    with pytest.raises(SystemExit, match='the data set is incomplete'):
        ev.probe_splits('caltech101', {'all': (f[:-1], y[:-1])})


def test_food101_resort_keeps_each_class_in_its_file_order(tmp_path):
    """40 images per class, listed in meta/train.json with the classes interleaved: an unstable sort reorders them."""
    base, names = tmp_path / 'food-101', {'pizza': [], 'apple_pie': []}
    os.makedirs(base / 'meta')
    (base / 'meta' / 'classes.txt').write_text('apple_pie\npizza\n')
    for k in range(40):
        for c in names:
            names[c].append(f'{c}/{k}')
            write_image(str(base / 'images' / f'{c}/{k}.jpg'), 3 * k + (120 if c == 'pizza' else 0), (8, 8))
    for split in ('train', 'test'):
        (base / 'meta' / f'{split}.json').write_text(json.dumps(names))
    args = ev.get_args(['--ckpt', 'unused', '--dataset', 'food101', '--data-dir', str(tmp_path), '--device', 'cpu',
                        '--results', str(tmp_path / 'r.jsonl')])
    args.ckpt = __file__  # any file: the key hashes it
    grey = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # an encoder whose feature is the mean pixel
    f, y = ev.features(args, grey, 8, ((0, 0, 0), (1, 1, 1)))['train']
    values = (f[:, 0] * 255).round().long()
    assert y.tolist() == [0] * 40 + [1] * 40
    assert values.tolist() == [3 * k for k in range(40)] + [120 + 3 * k for k in range(40)]


def test_the_monitor_compares_features_by_cosine_not_dot_product():
    train_split = (torch.tensor([[10.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 1]))
    test_split = (torch.tensor([[1.0, 1.2]]), torch.tensor([1]))  # dot product: [10, 2.2]; cosine: [0.64, 0.996]
    assert train.knn_top1(train_split, test_split) == 1.0


def test_analysis_standardises_its_views_parameters():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stats = data.param_stats(square(32))
    grey = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ds = data.Images(images, torch.zeros(64), 32)
    a = torch.cat([a for _, _, a in ev.view_features(grey, ds, torch.arange(64), data.STL10_NORM, stats, 'cpu')])
    a = a.flatten(0, 1)  # 16 views of each image
    varies = stats[1] > 0
    assert (a.mean(0)[varies].abs() < 0.15).all() and ((a.std(0)[varies] - 1).abs() < 0.15).all()


def test_the_few_shot_interval_halves_when_the_episodes_quadruple():
    feats = {'all': blobs(200, d=8, classes=8, shift=1.0)}
    small, large = (ev.few_shot(feats, 'blobs', 1, n, 'cpu', queries=4) for n in (200, 800))
    assert 0 < small['accuracy'] < 1 and small['ci95'] > 0
    assert large['ci95'] / small['ci95'] == pytest.approx(0.5, abs=0.08)


# ---------------------------------------------------------------- nothing lost, nothing silently wrong

def test_a_second_run_on_a_folder_in_use_ends_in_one_line_and_the_first_goes_on(stl, tmp_path):
    out = str(tmp_path / 'run')
    first = subprocess.Popen([sys.executable, *tiny_train_flags(stl[0], out, '--epochs', '50', '--eval-interval', '0',
                                                                 '--batch-size', '2')],
                             cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not os.path.exists(os.path.join(out, 'views.png')) and first.poll() is None:
        time.sleep(0.05)
    try:
        for extra in [[], ['--overwrite'], ['--resume']]:  # new, replacing, resuming: all while the first trains
            second = fails(train, tiny_train_flags(stl[0], out, '--epochs', '1', *extra)[1:])
            assert f'is in use by another train.py that is still running (pid {first.pid})' in second
        assert first.poll() is None and os.path.exists(os.path.join(out, 'views.png'))  # untouched, still training
    finally:
        first.kill()  # as kill -9: the system releases the lock
        first.wait()
    assert run(*tiny_train_flags(stl[0], out, '--epochs', '1', '--eval-interval', '0', '--overwrite')).returncode == 0


def test_unwritable_results_are_refused_before_any_work(tmp_path):
    for results, error in [(str(tmp_path), IsADirectoryError), ('', FileNotFoundError)]:  # a folder; an empty name
        with pytest.raises(error):  # Python names the file (or its absence) before any work
            ev.get_args(['--ckpt', 'c', '--dataset', 'stl10', '--results', results])


def test_a_link_to_a_parent_folder_lists_no_image_twice(tmp_path):
    write_folder_dataset(tmp_path / 'data', [('train', range(2), 4)])
    class0 = tmp_path / 'data' / 'train' / 'class0'
    os.symlink('..', class0 / 'loop')  # train/, which holds class0 and class1
    write_folder_dataset(class0 / 'sub', [('more', range(1), 2)])
    os.symlink(class0 / 'sub', class0 / 'again')  # a second way into sub/
    paths, labels = data.image_folder(str(tmp_path / 'data' / 'train'), ['class0', 'class1'])
    assert len(paths) == 10 == len(set(map(os.path.realpath, paths))) and labels.tolist() == [0] * 6 + [1] * 4


def test_the_probe_reads_through_links_and_skips_a_dangling_one(trained, tmp_path, capfd):
    elsewhere, folder = tmp_path / 'elsewhere', tmp_path / 'shapes'
    args = shapes_probe(trained, folder, tmp_path)
    shutil.move(folder / 'test', elsewhere)
    os.symlink(elsewhere, folder / 'test')  # the test split is a link
    os.symlink(tmp_path / 'gone.png', folder / 'train' / 'class0' / 'gone.png')  # a dangling link
    TF.to_pil_image(torch.zeros(3, 40, 40, dtype=torch.uint8)).save(elsewhere / 'class0' / '0.png')
    net, size, norm, *_ = restore(trained)
    feats = ev.features(args, net, size, norm)
    assert 'skipped unreadable image file' in capfd.readouterr().err and len(feats['train'][1]) == 5
    zero = data.encode(net, [(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1))], norm, 'cpu')[0][0]
    assert torch.allclose(feats['test'][0][0], zero, atol=1e-5)  # the image behind the link


def write_dtd(root, val_classes):
    base = root / 'dtd' / 'dtd'
    os.makedirs(base / 'labels')
    for split, classes in [('train', ['banded', 'dotted', 'woven']), ('val', val_classes), ('test', ['banded'])]:
        for name in classes:
            write_image(str(base / 'images' / name / f'{split}.jpg'), 9)
        (base / 'labels' / f'{split}1.txt').write_text(''.join(f'{c}/{split}.jpg\n' for c in classes))


def test_a_split_listing_other_classes_than_train_is_refused(tmp_path):
    write_dtd(tmp_path / 'ok', ['banded', 'dotted', 'woven'])
    assert materialise(data.labelled('dtd', str(tmp_path / 'ok'), 'val', 32))[1].tolist() == [0, 1, 2]
    write_dtd(tmp_path / 'short', ['banded', 'woven'])  # torchvision would label woven 1 in val, 2 in train
    with pytest.raises(SystemExit) as e:
        data.labelled('dtd', str(tmp_path / 'short'), 'val', 32)
    assert 'its val split lists 2 classes, train 3' in str(e.value)


@pytest.mark.parametrize('flags, message', [
    (['--analyze', '--few-shot', '1'], '--few-shot has no effect with --analyze'),
    (['--episodes', '100'], '--episodes has no effect with the linear probe'),
])
def test_a_flag_that_cannot_act_is_refused(flags, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        ev.get_args(['--ckpt', 'c', '--dataset', 'stl10', *flags])
    assert message in str(e.value) and '\n' not in str(e.value)
    few_shot = ev.get_args(['--ckpt', 'c', '--dataset', 'stl10', '--few-shot', '5', '--results', str(tmp_path / 'r')])
    assert few_shot.episodes == 2000


def test_the_image_size_defaults_to_the_data_sets():
    assert train.get_args([]).image_size == 96
    assert train.get_args(['--dataset', 'imagenet100']).image_size == 224
    assert train.get_args(['--dataset', 'folder', '--image-size', '64']).image_size == 64


def test_every_image_even_one_pixel_gives_a_crop_of_one_pixel_at_least():
    p = data.sample(torch.tensor([[1, 1], [1, 7], [7, 1], [2, 2]]).repeat(500, 1), torch.Generator().manual_seed(0))
    heights = torch.tensor([1, 1, 7, 2] * 500)
    assert (p[:, 2] >= 1).all() and (p[:, 3] >= 1).all() and (p[:, 0] + p[:, 2] <= heights).all()
    tiny = data.Images(torch.full((1, 3, 1, 1), 9, dtype=torch.uint8), torch.zeros(1), 32)
    x0, views, _ = tiny[(0, 3)]
    assert (views == 9).all() and views.shape == (2, 3, 32, 32)


def png_header_only(path, width, height):
    """A PNG file whose header declares width x height, with no pixel data."""
    def chunk(kind, body):
        return len(body).to_bytes(4, 'big') + kind + body + zlib.crc32(kind + body).to_bytes(4, 'big')
    ihdr = width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IEND', b''))


def test_a_decompression_bomb_is_skipped_by_name(tmp_path, capfd):
    write_image(str(tmp_path / 'a' / 'fine.png'), 5)
    png_header_only(tmp_path / 'a' / 'bomb.png', 20000, 10000)
    ds = data.Images(data.list_images(str(tmp_path)), torch.zeros(2), 32)  # bomb.png, fine.png
    assert data.image_sizes(ds).tolist() == [[30, 40]]
    (x, _), = list(data.loader(ds, 1))
    assert (x == 5).all() and f'skipped unreadable image file {tmp_path / "a" / "bomb.png"}' in capfd.readouterr().err


def test_a_sun397_line_of_no_listed_class_ends_in_one_line(tmp_path):
    base = tmp_path / 'SUN397'
    os.makedirs(base)
    (base / 'ClassName.txt').write_text('/a/abbey\n')
    (base / 'Training_01.txt').write_text('/a/abbey/sun_a.jpg\n/z/zoo/sun_z.jpg\n')
    (base / 'Testing_01.txt').write_text('/a/abbey/sun_a.jpg\n')
    write_image(str(base / 'a' / 'abbey' / 'sun_a.jpg'), 3)
    with pytest.raises(ValueError, match="'/z/zoo' is not in list"):  # the class of line 2 is not in ClassName.txt
        data.labelled('sun397', str(tmp_path), 'train', 32)


def test_the_set_up_installs_what_torchvisions_readers_need():
    with open(os.path.join(HERE, 'requirements.txt')) as f:
        assert 'scipy' in f.read().split()  # Caltech-101's and Flowers-102's readers import it
    import scipy.io  # installed by the set-up command
    assert callable(scipy.io.loadmat)


def test_a_full_disk_says_so_keeps_the_last_checkpoint_and_leaves_no_temporary(trained, tmp_path, monkeypatch):
    out = copy_of(trained, tmp_path)
    before = snapshot(out)
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    real_save = torch.save

    def full(obj, path):  # half a file, then the error torch raises on a full disk
        real_save({'half': 1}, path)
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 0: file write failed')
    monkeypatch.setattr(torch, 'save', full)
    model = STAR('resnet18', 'star', 4)
    model.load_state_dict(ckpt['model'])
    args = argparse.Namespace(**{**ckpt['args'], 'out_dir': out})  # this copy, not the run it was copied from
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SystemExit) as e:
        train.save_epoch(model, opt, ckpt['log'] + [{'epoch': 2}], args, {'norm': ckpt['norm'], 'stats': ckpt['stats']})
    assert 'ckpt.pt: the disk is full or failing (RuntimeError); what was there before is kept' in str(e.value)
    assert snapshot(out) == before  # no temporary, and encoder.pt and log.jsonl not ahead of ckpt.pt


def test_the_colour_orders_and_the_views_draw_from_streams_of_their_own():
    args = argparse.Namespace(seed=0, epochs=1, batch_size=20)
    (step,) = list(train.steps(20, args, 0, 0, 1))
    same = [torch.equal(train.step_orders(args, 0, s)[0], torch.rand(4, generator=data.generator(key)).argsort())
            for s, (_, key) in enumerate(step)]
    assert sum(same) < 5  # by chance 1 in 24 each; with one stream for both, all 20


def test_non_finite_weights_stop_every_process_together(tmp_path):
    root, out = tmp_path / 'data', str(tmp_path / 'run')
    write_folder_dataset(root, [('train', range(2), 4)], size=32)
    flags = ['train.py', '--dataset', 'folder', '--data-dir', str(root), '--out-dir', out, '--batch-size', '8',
             '--experts', '2', '--image-size', '32', '--workers', '0', '--eval-interval', '0']
    assert run(*flags, '--epochs', '1').returncode == 0
    before = poison_running_variance(out)
    torchrun = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                '--master_port', str(free_port())]
    proc = subprocess.run([*torchrun, *flags, '--epochs', '3', '--resume'], cwd=HERE, capture_output=True, text=True,
                          timeout=120)  # a process left waiting for the others would hang until gloo's timeout
    assert proc.returncode != 0 and proc.stderr.count('the weights are not finite after epoch 2') == 2, proc.stderr
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before


def test_a_huge_eq_weight_is_named_among_the_flags_to_lower(stl, tmp_path):
    proc = run(*tiny_train_flags(stl[0], str(tmp_path / 'run'), '--epochs', '1', '--eq-weight', '1e30'))
    assert proc.returncode == 1 and 'a lower --lr or --eq-weight' in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the analysis on both settings

def write_imagenet100(root, per_class=2, seed=0):
    """A fake ImageNet root: train/ and val/ of the 100 listed class folders (and one other), JPEGs of several sizes."""
    with open(os.path.join(HERE, 'splits', 'imagenet100.txt')) as f:
        classes = f.read().split()
    g = torch.Generator().manual_seed(seed)
    for split, n in [('train', per_class), ('val', 3)]:  # 300 listed val images: the CCA needs more than 256
        for k, c in enumerate(classes + ['n99999999']):
            for i in range(n):
                h, w = 36 + 7 * ((k + i) % 4), 48 - 5 * ((k + 2 * i) % 3)
                img = (torch.rand(3, h, w, generator=g) * 60 + 2 * (k % 90)).to(torch.uint8)
                os.makedirs(root / split / c, exist_ok=True)
                TF.to_pil_image(img).save(root / split / c / f'{i}.JPEG')
    return classes


@pytest.fixture(scope='module')
def imagenet_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('in100')
    write_imagenet100(root)
    out = root / 'run'
    proc = run('train.py', '--dataset', 'imagenet100', '--data-dir', str(root), '--out-dir', str(out), '--epochs', '1',
               '--batch-size', '50', '--experts', '4', '--image-size', '32', '--eval-interval', '0', '--workers', '1')
    assert proc.returncode == 0 and 'images of 32 px' in proc.stdout, proc.stderr
    return root, out


def test_the_analysis_views_are_trainings_for_the_same_key_and_statistics(imagenet_run):
    root, out = imagenet_run
    args = train.get_args(['--dataset', 'imagenet100', '--data-dir', str(root), '--image-size', '32'])
    images, _ = train.load_data(args)
    analysed = data.labelled('imagenet100', str(root), 'train', 32, TF.InterpolationMode.BILINEAR)
    stats = torch.load(out / 'ckpt.pt', weights_only=True)['stats']
    for i in (0, 57, 199):
        for a, b in zip(images[(i, hash((0, i, 0)))], analysed[(i, hash((0, i, 0)))]):
            assert torch.equal(a, b)
    grey = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    (_, _, a), = ev.view_features(grey, analysed, torch.tensor([57]), data.IMAGENET_NORM, stats, 'cpu')
    p = images[(57, hash((0, 57, 0)))][2]  # the first item of image 57: its first two views
    assert torch.allclose(a[0, :2], (p - stats[0]) / stats[1])


def test_the_statistics_survive_a_resume_on_other_files(tmp_path):
    for name, size in [('small', 32), ('large', 90)]:
        write_folder_dataset(tmp_path / name, [('train', range(1), 8)], size=size)
    flags = ['train.py', '--dataset', 'folder', '--out-dir', str(tmp_path / 'run'), '--batch-size', '8',
             '--experts', '2', '--image-size', '32', '--workers', '0']
    assert run(*flags, '--data-dir', str(tmp_path / 'small'), '--epochs', '1').returncode == 0
    first = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['stats']
    assert run(*flags, '--data-dir', str(tmp_path / 'large'), '--epochs', '2', '--resume').returncode == 0
    second = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['stats']
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0][data.COL['height']] < 32 < data.param_stats(torch.tensor([[90, 90]]))[0][data.COL['height']]


def test_analysis_end_to_end_on_imagenet100(imagenet_run, tmp_path, monkeypatch):
    root, out = imagenet_run
    results = tmp_path / 'r.jsonl'
    proc = run('eval_linear.py', '--ckpt', str(out / 'ckpt.pt'), '--dataset', 'imagenet100', '--data-dir', str(root),
               '--analyze', '--results', str(results))
    assert proc.returncode == 0, proc.stderr
    r = read_jsonl(results)[0]
    assert r['sample'] == 200 and r['views'] == 16 and r['image_size'] == 32
    assert 0 < r['frozen_mrr'] <= 1 and r['hit1'] <= r['hit5'] <= 1 and 0 <= r['cca'] <= 1
    assert len(r['routing_inv']) == 4 and sum(r['routing_inv']) == pytest.approx(1, abs=1e-5)
    assert 'hit5' in proc.stdout and 'frozen_hit5' in proc.stdout
    # the routing picture, beside the results, named by the checkpoint and the data set, draws the recorded weights
    assert r['routing_png'] == str(tmp_path / picture_name(r, 'imagenet100', root)) in proc.stdout
    ends, mark = routing_bars(r['routing_png'], 4)
    weights = zip(r['routing_inv'], r['routing_eq'])
    assert all(abs(end - (150 + 450 * w)) <= 1.5 for row, ws in zip(ends, weights) for end, w in zip(row, ws))


ROUTER_COLOURS = [(31, 119, 180), (255, 127, 14)]  # s_inv blue, s_eq orange


def routing_bars(png, n):
    """Where each bar of the routing picture ends ([expert][router], None: no bar) and the column of its 1/N mark."""
    x = TF.pil_to_tensor(Image.open(png))
    assert x.shape[1:] == (44 + 30 * n, 640)
    ends = [[None, None] for _ in range(n)]
    for k in range(n):
        for j, colour in enumerate(ROUTER_COLOURS):
            row = (x[:, 40 + 30 * k + 13 * j + 5] == torch.tensor(colour)[:, None]).all(0)
            ends[k][j] = row.nonzero().max().item() if row.any() else None
    mark = (x[:, 38, 150:] == 0).all(0).nonzero().squeeze(1) + 150  # between the title and the first bar
    assert len(mark) == 1 and (x[:, 40:36 + 30 * n, mark] == 0).all()  # one line, down every row
    return ends, mark.item()


def test_the_routing_picture_draws_what_its_numbers_say(tmp_path):
    base = {'name': 'run/ckpt.pt 0123abcd', 'dataset': 'stl10', 'data_dir': '/data'}
    cases = {'uniform': ([0.25] * 4, [0.25] * 4), 'one-hot': ([0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0])}
    for name, (s_inv, s_eq) in cases.items():
        ev.draw_routing(base | {'routing_inv': s_inv, 'routing_eq': s_eq, 'routing_png': str(tmp_path / f'{name}.png')})
    ends, mark = routing_bars(tmp_path / 'uniform.png', 4)
    assert mark == pytest.approx(150 + 450 / 4, abs=1)
    assert all(mark - 2 <= end <= mark for row in ends for end in row)  # every bar stops at the mark, none beyond
    ends, mark = routing_bars(tmp_path / 'one-hot.png', 4)
    assert [row[0] for row in ends] == [150, 150, 600, 150]  # the full bar 450 px; a weight of 0 draws a 1-px stub
    assert [row[1] for row in ends] == [375, 375, 150, 150] and ends[2][0] > mark


def test_what_the_analysis_holds_does_not_grow_with_the_split(trained, tmp_path, monkeypatch):
    """The predictor is fitted on a fixed sample whatever the size of train; test is a stream of small batches."""
    fitted, streams, sizes = [], [], []
    fit, score = ev.fit_predictor, ev.score
    monkeypatch.setattr(ev, 'SAMPLE', 6)
    monkeypatch.setattr(ev, 'fit_predictor', lambda h0, *a: fitted.append(len(h0)) or fit(h0, *a, epochs=1))

    def streaming(batches, *a):
        streams.append(inspect.isgenerator(batches))
        return score((sizes.append(len(b[0])) or b for b in batches), *a)
    monkeypatch.setattr(ev, 'score', streaming)
    for n in (65, 81):  # 260 and 324 test images (the CCA needs more than 256)
        folder = tmp_path / f'shapes{n}'
        write_folder_dataset(folder, [('train', range(4), 2), ('test', range(4), n)])
        ev.main(['--ckpt', trained, '--dataset', 'shapes', '--data-dir', str(folder), '--analyze', '--device', 'cpu',
                 '--results', str(tmp_path / 'r.jsonl')])
    assert fitted == [6, 6] and streams == [True, True] and max(sizes) <= 16 and sum(sizes) == 260 + 324
    assert [r['sample'] for r in read_jsonl(tmp_path / 'r.jsonl')] == [6, 6]


# ---------------------------------------------------------------- nothing lost, nothing silently wrong, round four

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """An image folder whose test split is large enough for the CCA: 4 classes, 2 training and 65 test images each."""
    root = tmp_path_factory.mktemp('shapes')
    write_folder_dataset(root, [('train', range(4), 2), ('test', range(4), 65)])
    return root


def test_each_routing_picture_is_named_by_checkpoint_data_set_and_folder(trained, shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, 'SAMPLE', 4)
    other = tmp_path / 'copy'
    shutil.copytree(shapes, other)
    for name, folder in [('shapes', shapes), ('shapes', other), ('my/set', shapes)]:  # the last: a name with a slash
        ev.main(['--ckpt', trained, '--dataset', name, '--data-dir', str(folder), '--analyze',
                 '--results', str(tmp_path / 'r.jsonl')])
    pictures = [r['routing_png'] for r in read_jsonl(tmp_path / 'r.jsonl')]
    assert len(set(pictures)) == 3 and all(os.path.isfile(p) for p in pictures)
    assert sorted(os.listdir(tmp_path)) == sorted(['copy', 'r.jsonl', *map(os.path.basename, pictures)])


def test_a_test_split_too_small_for_the_cca_is_refused_before_any_work(trained, tmp_path, monkeypatch):
    write_folder_dataset(tmp_path / 'few', [('train', range(4), 2), ('test', range(4), 5)])  # 20 test images
    monkeypatch.setattr(ev, 'fit_predictor', lambda *a: pytest.fail('the work began'))
    message = fails(ev, ['--ckpt', trained, '--dataset', 'shapes', '--data-dir', str(tmp_path / 'few'), '--analyze',
                         '--results', str(tmp_path / 'r.jsonl')])
    assert 'the CCA of z_inv and z_eq needs more than 256 test images; shapes has 20' in message
    assert os.path.getsize(tmp_path / 'r.jsonl') == 0


def test_a_linear_probe_of_one_class_is_refused(trained, tmp_path):
    write_folder_dataset(tmp_path / 'one', [('train', [0], 6), ('test', [0], 3)])
    message = fails(ev, ['--ckpt', trained, '--dataset', 'one', '--data-dir', str(tmp_path / 'one'),
                         '--results', str(tmp_path / 'r.jsonl')])
    assert 'a linear probe needs two classes or more' in message and os.path.getsize(tmp_path / 'r.jsonl') == 0


def test_results_are_never_appended_to_a_file_that_is_not_json_lines(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    ckpt = os.path.join(out, 'ckpt.pt')
    before = open(ckpt, 'rb').read()
    message = fails(ev, ['--ckpt', ckpt, '--dataset', 'stl10', '--results', ckpt])
    assert 'is not a file of JSON lines' in message and open(ckpt, 'rb').read() == before
    assert 'is not a file of JSON lines' in fails(ev, ['--summary', '--results', ckpt])  # nor tabled
    with pytest.raises(FileNotFoundError, match='none.jsonl'):  # the summary of no file: Python names it
        ev.get_args(['--summary', '--results', str(tmp_path / 'none.jsonl')])
    assert not os.path.exists(tmp_path / 'none.jsonl')


@pytest.mark.parametrize('flag', [['--ckpt', 'c'], ['--dataset', 'stl10'], ['--data-dir', 'data'], ['--analyze'],
                                  ['--few-shot', '5'], ['--episodes', '10']])
def test_the_summary_refuses_flags_it_would_ignore(tmp_path, flag):
    message = fails(ev, ['--summary', '--results', str(tmp_path / 'r.jsonl'), *flag])
    assert f'{flag[0]} has no effect with --summary: drop it' in message


def test_a_resume_says_which_statistics_standardise_the_parameters(stl, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    kept = run(*tiny_train_flags(stl[0], out, '--epochs', '2', '--eval-interval', '0', '--resume'))
    assert kept.returncode == 0 and 'a standardised with the statistics kept in ckpt.pt' in kept.stdout
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    del ckpt['stats']  # a checkpoint of an earlier layout
    torch.save(ckpt, os.path.join(out, 'ckpt.pt'))
    redrawn = run(*tiny_train_flags(stl[0], out, '--epochs', '3', '--eval-interval', '0', '--resume'))
    assert redrawn.returncode == 0 and 'a standardised with statistics of these images' in redrawn.stdout


@pytest.mark.parametrize('task', [[], ['--few-shot', '1'], ['--analyze']])
def test_empty_class_folders_are_named_for_every_task(trained, tmp_path, task):
    for c in range(2):
        write_image(str(tmp_path / 'data' / 'train' / f'class{c}' / '0.png'), 10 * c)
        os.makedirs(tmp_path / 'data' / 'test' / f'class{c}')
    message = fails(ev, ['--ckpt', trained, '--dataset', 'shapes', '--data-dir', str(tmp_path / 'data'), *task,
                         '--results', str(tmp_path / 'r.jsonl')])
    assert f'no image files (.jpg, .jpeg, .png, .bmp, .gif, .webp, .tif, .tiff) below {tmp_path}/data/test' in message


def test_images_of_one_pixel_train_with_their_constant_fields_standardised_to_zero(tmp_path):
    for i in range(16):
        write_image(str(tmp_path / 'dots' / f'{i}.png'), 15 * i, size=(1, 1))
    out = str(tmp_path / 'run')
    proc = run('train.py', '--dataset', 'folder', '--data-dir', str(tmp_path / 'dots'), '--out-dir', out, '--epochs',
               '1', '--batch-size', '8', '--experts', '2', '--image-size', '32')
    assert proc.returncode == 0, proc.stderr
    log, = read_log(out)
    assert math.isfinite(log['loss_inv']) and math.isfinite(log['loss_eq'])
    mean, std = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['stats']
    box = [data.COL[f] for f in ('top', 'left', 'height', 'width')]
    assert mean[box].tolist() == [0, 0, 1, 1] and std[box].tolist() == [1, 1, 1, 1]  # every crop the one pixel


def test_a_reader_that_refuses_the_files_is_quoted(tmp_path):
    write_image(str(tmp_path / 'caltech101' / '101_ObjectCategories' / 'cat' / 'image_0001.jpg'), 5)
    with pytest.raises(SystemExit) as e:  # no BACKGROUND_Google: torchvision's reader refuses the copy
        data.labelled('caltech101', str(tmp_path), 'all', 32)
    assert 'ValueError: list.remove(x): x not in list' in str(e.value) and 'Caltech101' in str(e.value)


def test_a_checkpoint_that_records_no_normalisation_takes_its_data_sets(trained, tmp_path, capsys):
    out = copy_of(trained, tmp_path)
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    del ckpt['norm']  # a checkpoint of an earlier layout
    torch.save(ckpt, os.path.join(out, 'ckpt.pt'))
    _, size, norm, *_ = restore(os.path.join(out, 'ckpt.pt'))
    assert size == 32 and norm == data.STL10_NORM and 'records no normalisation' in capsys.readouterr().out
    ckpt['args']['dataset'] = 'folder'
    torch.save(ckpt, os.path.join(out, 'ckpt.pt'))
    assert restore(os.path.join(out, 'ckpt.pt'))[2] == data.IMAGENET_NORM


def test_paths_whose_bytes_are_not_utf8_print_and_the_result_is_kept(stl, trained, tmp_path):
    odd = os.path.join(os.fsencode(tmp_path), b'r\xffn')
    shutil.copytree(os.path.dirname(trained), os.fsdecode(odd))
    env = {**os.environ, 'PYTHONIOENCODING': 'utf-8:strict'}  # stdout as a UTF-8 locale's, strict
    ckpt = os.path.join(odd, b'ckpt.pt')
    results = str(tmp_path / 'r.jsonl')
    probe = subprocess.run([sys.executable, b'eval_linear.py', b'--ckpt', ckpt, b'--dataset', b'stl10', b'--data-dir',
                            os.fsencode(stl[0]), b'--results', os.fsencode(results)], cwd=HERE, capture_output=True,
                           env=env, timeout=600)
    assert probe.returncode == 0, probe.stderr
    assert b'r\xffn/ckpt.pt' in probe.stdout
    assert read_jsonl(results)[0]['ckpt'] == os.fsdecode(os.path.realpath(ckpt))
    finished = subprocess.run([sys.executable, b'train.py', *map(os.fsencode, tiny_train_flags(stl[0], 'x')[1:3]),
                               b'--out-dir', odd, b'--epochs', b'1', b'--resume', b'--batch-size', b'16', b'--experts',
                               b'4', b'--image-size', b'32', b'--eval-interval', b'1'], cwd=HERE, capture_output=True,
                              env=env, timeout=600)
    assert finished.returncode == 0 and b'r\xffn: the run is finished' in finished.stdout, finished.stderr


def test_flags_parse_where_stdout_cannot_be_reconfigured(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, 'stdout', io.StringIO())  # as a notebook's stream: no reconfigure
    (tmp_path / 'r.jsonl').touch()
    assert train.get_args(['--epochs', '3']).epochs == 3
    assert ev.get_args(['--summary', '--results', str(tmp_path / 'r.jsonl')]).summary


def test_routing_pictures_beside_the_default_results_are_ignored_by_git():
    if not os.path.isdir(os.path.join(HERE, '.git')):
        pytest.skip('not a git checkout')
    check = subprocess.run(['git', 'check-ignore', '-q', 'routing-0123abcd-4567ef89.png'], cwd=HERE)
    assert check.returncode == 0


# ---------------------------------------------------------------- behaviours pinned through what a run yields

@pytest.fixture(scope='module')
def simclr_run(stl, tmp_path_factory):
    """A SimCLR run started from the command line as the README starts it."""
    out = str(tmp_path_factory.mktemp('simclr'))
    proc = run('train.py', '--heads', 'simclr', '--data-dir', stl[0], '--out-dir', out, '--epochs', '1',
               '--batch-size', '16', '--image-size', '32', '--eval-interval', '1')
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_simclr_run_starts_from_the_command_line_and_has_no_equivariant_task(simclr_run):
    log, = read_log(simclr_run)
    ckpt = torch.load(os.path.join(simclr_run, 'ckpt.pt'), weights_only=True)
    assert log['loss_eq'] == 0 and log['loss_inv'] > 0 and 0 <= log['knn_top1'] <= 1
    assert ckpt['args']['heads'] == 'simclr' and ckpt['args']['eq_weight'] == 0 and ckpt['args']['experts'] is None
    assert not any(k.startswith('shift.') for k in ckpt['model']) and ckpt['model']['heads.experts.w1'].shape[0] == 1


def test_an_imagenet_normalised_run_is_probed_with_imagenets_statistics(imagenet_run):
    _, out = imagenet_run
    for name in ('ckpt.pt', 'encoder.pt'):  # a ResNet-18 at 32 px: nothing but the record says ImageNet
        _, size, norm, *_ = restore(str(out / name))
        assert size == 32 and [list(v) for v in norm] == [list(v) for v in data.IMAGENET_NORM]


def test_the_analysis_standardises_with_the_runs_statistics_on_images_of_other_sizes(simclr_run, shapes, tmp_path):
    ckpt = os.path.join(simclr_run, 'ckpt.pt')
    ev.main(['--ckpt', ckpt, '--dataset', 'shapes', '--data-dir', str(shapes), '--analyze',
             '--results', str(tmp_path / 'r.jsonl')])
    (r,) = read_jsonl(tmp_path / 'r.jsonl')
    kept = torch.load(ckpt, weights_only=True)['stats']  # drawn on STL-10 at 32 px; the shapes are 40 px
    assert r['stats'] == [s.tolist() for s in kept] and r['stats'] != [s.tolist() for s in data.param_stats(square(40))]


def test_the_analysis_fits_on_the_same_training_images_whatever_the_random_state(simclr_run, tmp_path, monkeypatch):
    write_folder_dataset(tmp_path / 'few', [('train', range(4), 3), ('test', range(4), 2)])
    monkeypatch.setattr(ev, 'SAMPLE', 5)  # 5 of the 12 training images
    for seed in (1, 2):
        torch.manual_seed(seed)
        ev.main(['--ckpt', os.path.join(simclr_run, 'ckpt.pt'), '--dataset', 'shapes', '--data-dir',
                 str(tmp_path / 'few'), '--analyze', '--results', str(tmp_path / 'r.jsonl')])
    first, second = read_jsonl(tmp_path / 'r.jsonl')
    assert first['sample'] == 5 and {k: v for k, v in first.items() if k.startswith('frozen')} == {
        k: v for k, v in second.items() if k.startswith('frozen')}


def test_a_routing_picture_that_cannot_be_drawn_never_costs_the_result(trained, shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, 'SAMPLE', 4)
    monkeypatch.setattr(Image.Image, 'save', lambda *a, **k: (_ for _ in ()).throw(OSError('No space left on device')))
    with pytest.raises(OSError, match='No space left'):
        ev.main(['--ckpt', trained, '--dataset', 'shapes', '--data-dir', str(shapes), '--analyze',
                 '--results', str(tmp_path / 'r.jsonl')])
    (r,) = read_jsonl(tmp_path / 'r.jsonl')
    assert r['task'] == 'analysis' and len(r['routing_inv']) == 4 and not os.path.exists(r['routing_png'])


def test_the_blur_of_a_batch_gives_each_image_its_own_sigma():
    x = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    blurred = data.gaussian_blur(x, sigma)
    for i in range(4):  # a kernel of a tenth of the side, odd: 5 at 40 px
        assert torch.allclose(blurred[i], TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2), atol=1e-6)


def test_the_logged_one_nn_accuracy_is_a_hand_computed_one(stl, full_run):
    net, size, norm, *_ = restore(os.path.join(full_run, 'encoder.pt'))  # the weights of the last epoch
    (train_f, train_y), (test_f, test_y) = ((net.eval()(TF.normalize(x.float() / 255, *norm)).detach(), y) for x, y in
                                            (materialise(data.labelled('stl10', stl[0], s, size)) for s in
                                             ('train', 'test')))
    hits = 0
    for f, y in zip(test_f, test_y):
        cosines = [torch.dot(f, t) / (f.norm() * t.norm()) for t in train_f]
        hits += int(train_y[int(torch.stack(cosines).argmax())] == y)
    assert read_log(full_run)[-1]['knn_top1'] == pytest.approx(hits / len(test_y), abs=1e-6)  # float32 of a count
