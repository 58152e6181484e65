"""Transfer probing and analysis of a pretrained encoder (the paper's protocol, after AugSelf).
  linear probe:  python eval_linear.py --ckpt out/ckpt.pt --dataset cifar10
  few-shot:      python eval_linear.py --ckpt out/ckpt.pt --dataset cub200 --data-dir ~/data/cub200 --few-shot 5
  analysis:      python eval_linear.py --ckpt out/ckpt.pt --dataset stl10 --analyze
  the table:     python eval_linear.py --summary"""
import argparse
import functools
import hashlib
import json
import math
import os

import torch
import torch.nn.functional as F
import torchvision.datasets as D
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import data
import train
from data import fail
from model import EMBED, STAR, Shift, encoder

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
# AugSelf's validation hold-outs (ImageNet-100's: the STAR authors'): (train, val) sizes and the seed of random_split
HOLD_OUT = {'cifar10': (45000, 5000, 43), 'cifar100': (45000, 5000, 44), 'food101': (68175, 7575, 42),
            'pets': (2940, 740, 49), 'cars': (6494, 1650, 45), 'mit67': (4690, 670, 51), 'stl10': (4500, 500, 50),
            'imagenet100': (114020, 12669, 12)}
PRETRAIN = {'stl10': (96, data.STL10_NORM), 'imagenet100': (224, data.IMAGENET_NORM)}
WORKERS = min(8, os.cpu_count() or 1)  # DataLoader processes that read and resize the images
MEAN_PER_CLASS = {'pets', 'flowers102', 'caltech101', 'aircraft'}
WEIGHTS = torch.logspace(-6, 5, 45)  # the L2 weights w searched on the validation split
ANALYSIS_COLUMNS = ['cca', 'cca_unpaired', 'cca_top10', 'erank_inv', 'erank_eq', 'mrr', 'hit1', 'pre', 'frozen_mrr',
                    'frozen_hit1', 'frozen_pre']
SHOWN = ['accuracy', 'ci95', 'metric', 'w', 'val_accuracy', 'splits', 'episodes', 'pool', 'chance_mrr',
         *ANALYSIS_COLUMNS, 'note']


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=train.Help)
    p.add_argument('--ckpt', help="train.py's ckpt.pt or encoder.pt, or an official checkpoint ({'backbone': ...})")
    p.add_argument('--dataset', help=f'stl10, imagenet100, sun397, {", ".join(TORCHVISION)}; any other name is an '
                                     'image folder (--data-dir with train/, test/ of class folders: mit67, cars, ...)')
    p.add_argument('--data-dir', default='data', help='torchvision root (downloads there when online) or image folder')
    p.add_argument('--metric', choices=['top1', 'mean-per-class'],
                   help='default: mean-per-class for pets, flowers102, caltech101, aircraft; top1 otherwise')
    p.add_argument('--few-shot', type=int, metavar='K', help='5-way K-shot episodes instead of the linear probe')
    p.add_argument('--episodes', type=int, default=2000, help='few-shot episodes')
    p.add_argument('--analyze', action='store_true', help='equivariance of the frozen features; with a ckpt.pt of an '
                   'equivariant head also redundancy (CCA), its own predictor, and routing (routing-HASH.png)')
    p.add_argument('--summary', action='store_true', help='print the tables of the results in --results')
    p.add_argument('--results', default='results.jsonl', help='every run appends a JSON line here')
    p.add_argument('--cache-dir', default='.cache/features', help='encoder features, keyed by all they depend on')
    p.add_argument('--pretrain-data', choices=list(PRETRAIN), help='size and normalisation of encoders without '
                   'train.py arguments: stl10 (96 px) or imagenet100 (224 px); default from the architecture')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda or cuda:N')
    args = p.parse_args(argv)
    train.check_device(args.device)
    train.require(args, {'few_shot': (1, math.inf), 'episodes': (1, math.inf)})
    if not args.summary:
        check_task(args)
    return args


def check_task(args):
    """Refuse, before any work, what cannot run to the end: a missing flag, an unknown data set, unwritable output."""
    if not (args.ckpt and args.dataset):
        fail('give --ckpt and --dataset (or --summary)')
    if os.sep in args.dataset or (args.dataset not in [*TORCHVISION, 'stl10', 'imagenet100', 'sun397'] and
                                  not os.path.isdir(os.path.join(args.data_dir, 'train'))):
        fail(f'--dataset {args.dataset}: not one of stl10, imagenet100, sun397, {", ".join(TORCHVISION)}, nor a name '
             f'for the image folder --data-dir {args.data_dir} (which needs train/ and test/ of class folders)')
    if args.analyze and 'all' in TORCHVISION.get(args.dataset, (None, {}))[1]:
        fail(f'--analyze fits on a train split and scores on a test split; {args.dataset} has no official ones')
    train.writable(args.cache_dir, '--cache-dir')
    train.writable(os.path.dirname(os.path.abspath(args.results)), 'the folder of --results')


def load_encoder(path, pretrain_data=None):
    """(encoder, image size, normalisation, checkpoint) from any checkpoint layout; an encoder without train.py's
    arguments takes those of its pretraining data (`pretrain_data`, by default from the architecture)."""
    ckpt, size = train.load_checkpoint(path), None
    state = ckpt.get('backbone', ckpt)  # encoder.pt, or the official STAR / AugSelf layout
    if 'model' in ckpt and 'args' in ckpt:  # train.py's ckpt.pt
        size, norm = ckpt['args']['image_size'], ckpt['norm']
        state = {k.removeprefix('encoder.'): v for k, v in ckpt['model'].items() if k.startswith('encoder.')}
    state = {k.removeprefix('module.'): v for k, v in state.items() if not k.startswith('fc.')}
    arch = 'resnet50' if 'layer1.0.conv3.weight' in state else 'resnet18'
    net, _ = encoder(arch)
    train.load_weights(net, state, path)
    sidecar = os.path.join(os.path.dirname(path), 'encoder.json')  # written by train.py beside encoder*.pt
    if size is None and os.path.exists(sidecar) and not pretrain_data:
        with open(sidecar) as f:
            run = json.load(f)
        size, norm = run['image_size'], run['norm']
    if size is None:
        pretrain_data = pretrain_data or ('imagenet100' if arch == 'resnet50' else 'stl10')
        size, norm = PRETRAIN[pretrain_data]
        print(f'{path}: a {arch} without train.py arguments, probed as pretrained on {pretrain_data} ({size} px, '
              f'its normalisation); --pretrain-data sets this')
    return net, size, norm, ckpt


def load_split(name, root, split, size):
    """A data set of (uint8 image resized (bicubic) and centre-cropped to size, label) items of one split; an image
    folder's labelled by the classes of its train/."""
    images = functools.partial(data.Images, size=size, mode=TF.InterpolationMode.BICUBIC)
    if name == 'stl10':
        return images(*data.stl10(root, split, size))
    if name == 'sun397':
        return images(*data.sun397(root, split))
    if name == 'imagenet100':
        return images(*data.imagenet100(root, 'val' if split == 'test' else split))
    if name not in TORCHVISION:
        classes = data.class_folders(os.path.join(root, 'train'))
        if not classes:
            fail(f'{root}/train holds no class folders; an image-folder data set is train/ and test/ of class folders')
        paths, labels, _ = data.image_folder(os.path.join(root, split), classes)
        stray = sorted(set(data.list_images(os.path.join(root, split))) - set(paths))
        if stray:
            fail(f'{root}/{split}: {len(stray)} images are not in a class folder of the training split (e.g. '
                 f'{", ".join(os.path.relpath(p, os.path.join(root, split)) for p in stray[:3])}); move them')
        return images(paths, labels)
    cls, kwargs = TORCHVISION[name]
    try:
        transform = functools.partial(data.pil_to_uint8, size=size)
        return cls(root, **kwargs.get(split, kwargs.get('all')), transform=transform, download=True)
    except Exception as e:
        fail(f'{name} ({split}) not found in {root}, download failed ({type(e).__name__}); place the files where '
             f'torchvision.datasets.{cls.__name__}(root="{root}") expects them')


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def features(args, net, size, norm):
    """{split: (features, labels)}, encoded once and cached under a key of all they depend on."""
    root = os.path.realpath(args.data_dir)
    ours = (os.path.realpath(args.cache_dir) + os.sep, os.path.realpath(args.results))  # may lie inside the data
    paths = sorted(p for d, _, fs in os.walk(root) for f in fs if not (p := os.path.join(d, f)).startswith(ours))
    files = [(os.path.relpath(p, root), st.st_size, st.st_mtime_ns) for p, st in zip(paths, map(os.stat, paths))]
    out, digest = {}, sha256(args.ckpt)
    for split in TORCHVISION[args.dataset][1] if args.dataset in TORCHVISION else ['train', 'test']:
        key = json.dumps([digest, args.dataset, root, files, split, size, norm, 'float32', 'streamed']).encode()
        path = os.path.join(args.cache_dir, f'{args.dataset}-{split}-{hashlib.sha256(key).hexdigest()[:16]}.pt')
        try:
            out[split] = torch.load(path, weights_only=True)
        except Exception:  # not cached yet, or a corrupt file: encode batch by batch as the loader reads the images
            batches = data.loader(load_split(args.dataset, args.data_dir, split, size), WORKERS)
            f, y = train.encode(net.to(args.device), batches, norm, torch.device(args.device))
            # AugSelf's Food-101 order: class by class as in meta/classes.txt (alphabetical), each in SPLIT.json's
            order = y.argsort(stable=True) if args.dataset == 'food101' else torch.arange(len(y))
            out[split] = f[order], y[order]
            train.save(out[split], path)
    return out


def random_split(f, y, held_out, seed):
    """(rest, held-out) of (f, y), split as torch.utils.data.random_split splits with a generator seeded `seed`."""
    i = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = len(y) - held_out
    return (f[i[:n]], y[i[:n]]), (f[i[n:]], y[i[n:]])


def probe_splits(name, feats):
    """(train, val, test): official splits; AugSelf's index files (Caltech-101's into the whole set, SUN397's into
    its train split); else AugSelf's hold-outs (HOLD_OUT, scaled to the size), else (ours) 10% val."""
    path = os.path.join(data.SPLITS, f'{name}.json')
    if os.path.exists(path):
        source = feats.pop('all') if 'all' in feats else feats['train']
        with open(path) as f:
            for split, i in json.load(f).items():  # one line if the data set is smaller than the file expects
                if max(i, default=-1) >= len(source[1]):
                    fail(f'{name} has {len(source[1])} images where AugSelf\'s split file indexes up to {max(i) + 1}; '
                         f'the data set is incomplete: download it again')
                feats[split] = source[0][i], source[1][i]
    if 'val' not in feats:
        n_train, n_val, seed = HOLD_OUT.get(name, (9, 1, 0))
        if len(feats['train'][1]) < 2:
            fail(f'{name} has {len(feats["train"][1])} training image(s): too few to hold out a validation split')
        n_val = max(1, len(feats['train'][1]) * n_val // (n_train + n_val))
        feats['train'], feats['val'] = random_split(*feats['train'], n_val, seed)
    return feats['train'], feats['val'], feats['test']


def with_bias(x):
    return torch.cat([x, torch.ones_like(x[..., :1])], -1)


def minimise(loss, theta):
    """theta minimising loss(theta) by full-batch L-BFGS, as AugSelf runs it."""
    theta = theta.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=5000, tolerance_grad=1e-10, tolerance_change=0,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        value = loss(theta)
        value.backward()
        return value
    opt.step(closure)
    return theta.detach()


def logistic_regression(x, y, n_classes, w, init=None):
    """AugSelf's probe: summed cross-entropy + w ||theta||^2 (bias included); theta is (d+1) x C."""
    x = with_bias(x)
    init = x.new_zeros(x.shape[1], n_classes) if init is None else init
    return minimise(lambda t: F.cross_entropy(x @ t, y, reduction='sum') + w * t.pow(2).sum(), init)


def one_vs_rest(x, y, n_classes):
    """scikit-learn's LogisticRegression(solver='liblinear'), C = 1, for E episodes (x: E x n x d) at once: per
    class, 1/2 ||[theta; b]||^2 + sum log(1 + exp(-y (theta x + b))), y = +-1. Returns E x (d+1) x C."""
    x, y_c = with_bias(x), 2 * F.one_hot(y, n_classes).float() - 1
    init = x.new_zeros(x.shape[0], x.shape[-1], n_classes)
    return minimise(lambda t: t.pow(2).sum() / 2 + F.softplus(-y_c * (x @ t)).sum(), init)


def classify(theta, x):
    return (with_bias(x) @ theta).argmax(-1)


def accuracy(pred, y, per_class):
    if not per_class:
        return (pred == y).float().mean().item()
    return torch.stack([(pred[y == c] == c).float().mean() for c in y.unique()]).mean().item()


def linear_probe(feats, name, per_class, device):
    """Choose w on val (each fit warm-started from the last), refit on train + val, report test (after AugSelf)."""
    (xt, yt), (xv, yv), (xs, ys) = (tuple(t.to(device) for t in s) for s in probe_splits(name, feats))
    n_classes, theta, scores = int(max(yt.max(), yv.max(), ys.max())) + 1, None, []
    for w in tqdm(WEIGHTS.tolist(), desc='choosing w on val', leave=False):
        theta = logistic_regression(xt, yt, n_classes, w, theta)
        scores.append((accuracy(classify(theta, xv), yv, per_class), w, theta))
    best, w, theta = max(scores, key=lambda s: s[0])  # the first w of the best validation accuracy
    theta = logistic_regression(torch.cat([xt, xv]), torch.cat([yt, yv]), n_classes, w, theta)
    return {'accuracy': accuracy(classify(theta, xs), ys, per_class), 'val_accuracy': best, 'w': w,
            'splits': {'train': len(yt), 'val': len(yv), 'test': len(ys)}}


def episodes(labels, n, k, queries, ways=5, seed=0):
    """n episodes as AugSelf draws them: support and query indices (n x ways*k, n x ways*queries) and their labels.
    Classes of <= k images are dropped; a class short of k + queries draws its queries with replacement."""
    g = torch.Generator().manual_seed(seed)
    by_class = [i for i in (torch.nonzero(labels == c).squeeze(1) for c in labels.unique()) if len(i) > k]
    if len(by_class) < ways:
        fail(f'{ways}-way {k}-shot needs {ways} classes of more than {k} images; this data set has {len(by_class)}')
    support, query = [], []
    for _ in range(n):
        for c in torch.randperm(len(by_class), generator=g)[:ways]:
            i = by_class[c][torch.randperm(len(by_class[c]), generator=g)]
            support.append(i[:k])
            rest = i[k:]
            query.append(rest[:queries] if len(rest) >= queries else
                         rest[torch.randint(len(rest), (queries,), generator=g)])
    way = torch.arange(ways)
    return (torch.cat(support).view(n, -1), torch.cat(query).view(n, -1), way.repeat_interleave(k),
            way.repeat_interleave(queries))


def few_shot_pool(name, feats):
    """AugSelf's episode pool: the test split for FC100, every split for the others (CUB-200: train + test)."""
    pool = ['test'] if name == 'fc100' else list(feats)
    return torch.cat([feats[s][0] for s in pool]), torch.cat([feats[s][1] for s in pool])


def few_shot(f, y, k, n, device, queries=16, chunk=100):
    """Mean accuracy and 95% interval (1.96 std / sqrt(n)) of n 5-way k-shot episodes, `chunk` fitted at once."""
    support, query, ys, yq = episodes(y, n, k, queries)
    f, acc = f.to(device), []
    for s, q in zip(support.split(chunk), query.split(chunk)):
        theta = one_vs_rest(f[s], ys.expand(len(s), -1).to(device), 5)
        acc.append((classify(theta, f[q]) == yq.to(device)).float().mean(1).cpu())
    acc = torch.cat(acc)
    return {'accuracy': acc.mean().item(), 'ci95': 1.96 * acc.std(correction=0).item() / math.sqrt(n)}


def cca(x, y, ridge=1e-6):
    """Canonical correlations of paired rows, largest first: singular values of Cxx^-1/2 Cxy Cyy^-1/2 (ridged)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)

    def inv_sqrt(c):
        e, v = torch.linalg.eigh(c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype))
        return v @ torch.diag(e.rsqrt()) @ v.T
    return torch.linalg.svdvals(inv_sqrt(x.T @ x) @ (x.T @ y) @ inv_sqrt(y.T @ y))


def effective_rank(z):
    """exp of the entropy of the normalised singular values of centred z: the number of dimensions in use."""
    s = torch.linalg.svdvals(z.double() - z.double().mean(0))
    p = s[s > 0] / s.sum()
    return torch.exp(-(p * p.log()).sum()).item()


def equivariance(pred, target):
    """Each prediction (N x M x d) ranks the true view among the M views of its image by cosine similarity, ties
    broken at random in expectation (g views above it, e tied, itself included): MRR, hit@1, hit@5, and PRE."""
    sim = F.normalize(pred, dim=2) @ F.normalize(target, dim=2).mT
    d = sim.diagonal(dim1=1, dim2=2)[..., None]
    g, e = (sim > d).sum(-1).double(), (sim == d).sum(-1).double()
    return {'mrr': ((torch.digamma(g + e + 1) - torch.digamma(g + 1)) / e).mean().item(),
            **{f'hit{k}': ((k - g) / e).clamp(0, 1).mean().item() for k in (1, 5)},
            'pre': ((pred - target).norm(dim=2) / target.norm(dim=2)).mean().item()}


def fit_predictor(h0, h_v, a, epochs=10, seed=0):
    """A shift predictor h(v) ~ h(x0) + phi([h(x0); psi(a)]) at the encoder's width, fitted to frozen features."""
    torch.manual_seed(seed)
    predictor, (n, m) = Shift(h0.shape[1]), a.shape[:2]
    opt = torch.optim.Adam(predictor.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc='fitting the predictor', leave=False):
        for i in torch.randperm(n * m).split(256):
            loss = F.mse_loss(predictor(h0[i // m], a.flatten(0, 1)[i]), h_v.flatten(0, 1)[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return predictor.eval()


def view_features(net, ds, norm, device, stats, views, seed=0):
    """Features h(x0) (N x d) of a data set's images, h(v) of `views` views of each (N x views x d), and their
    standardised parameters a."""
    images = torch.cat([x for x, _ in data.loader(ds, WORKERS)])
    ds, h_v, a = data.Images(images, torch.zeros(len(images)), images.shape[-1]), [], []
    for m in tqdm(range(views), desc='views', leave=False):
        g, items = torch.Generator().manual_seed(hash((seed, m))), torch.arange(len(ds)).split(256)
        crops = data.loader(ds, WORKERS, [[(i, hash((seed, m, i))) for i in b.tolist()] for b in items])
        batches = ((data.augment(v[:, 0].to(device).float().div(255), p[:, 0].to(device), data.jitter_order(g)),
                    p[:, 0]) for _, v, p in crops)  # the first view of each item, augmented on the device
        f, p = train.encode(net, batches, norm, device)
        h_v.append(f)
        a.append((p - stats[0]) / stats[1])
    return train.encode(net, data.loader(ds, WORKERS), norm, device)[0], torch.stack(h_v, 1), torch.stack(a, 1)


@torch.no_grad()
def model_analysis(model, h0, h_v, a):
    """A model with an equivariant head, on test features: redundancy of z_inv and z_eq (CCA; of views; of unpaired
    rows, the floor n images give; effective ranks), its own predictor's ranking, and each router's mean weights."""
    z, views = model.eval().heads(h0), [model.heads(h) for h in tqdm(h_v.unbind(1), desc='model heads', leave=False)]
    z1, z_eq = views[0], torch.stack([v['z_eq'] for v in views], 1)
    z_hat = torch.stack([model.shift(z['z_eq'], a_m) for a_m in a.unbind(1)], 1)
    corr = cca(z['z_inv'], z['z_eq'])
    unpaired = z['z_eq'][torch.randperm(len(h0), generator=torch.Generator().manual_seed(0))]  # CCA's floor at this n
    return {'cca': corr.mean().item(), 'cca_top10': corr[:10].mean().item(), **equivariance(z_hat, z_eq),
            'cca_views': cca(z1['z_inv'], z1['z_eq']).mean().item(),
            'cca_unpaired': cca(z['z_inv'], unpaired).mean().item(),
            'erank_inv': effective_rank(z['z_inv']), 'erank_eq': effective_rank(z['z_eq']),
            'routing_inv': z['s_inv'].mean(0).tolist(), 'routing_eq': z['s_eq'].mean(0).tolist()}


def analyze(args, net, size, norm, ckpt, views=16):
    """Equivariance of any encoder's frozen features: a predictor fitted on train ranks each test view among `views`
    views of its image; model_analysis for train.py checkpoints with an equivariant head."""
    run, model = ckpt.get('args', {}), None
    if run.get('heads', 'simclr') != 'simclr':  # a train.py model with an equivariant head
        model = STAR(run['arch'], run['heads'], run['experts'])
        train.load_weights(model, ckpt['model'], args.ckpt)
    net, stats = net.to(args.device), data.param_stats(torch.tensor([[size, size]]))
    (h0, h_v, a), (t0, t_v, t_a) = (view_features(net, load_split(args.dataset, args.data_dir, split, size), norm,
                                                  args.device, stats, views) for split in ('train', 'test'))
    out = {'views': views, 'chance_mrr': sum(1 / k for k in range(1, views + 1)) / views}
    predictor = fit_predictor(h0, h_v, a)
    with torch.no_grad():
        t_hat = torch.stack([predictor(t0, a_m) for a_m in t_a.unbind(1)], 1)
    out |= {f'frozen_{k}': v for k, v in equivariance(t_hat, t_v).items()}
    if model and len(t0) < 10 * 2 * EMBED:
        out['note'] = (f'{len(t0)} test images are too few for a CCA of 2 x {EMBED} dimensions (want 10 times as '
                       f'many): compare cca with cca_unpaired, its floor at this number of images')
    return out | (model_analysis(model, t0, t_v, t_a) if model else {})


def rank(value, values):
    return sum(v > value for v in values) + (sum(v == value for v in values) + 1) / 2


def table(task, rows):
    """Rows {checkpoint: {column: value}} as text; a linear probe adds the mean and average rank (ties share) over
    the data sets every row has."""
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))  # analysis: in ANALYSIS_COLUMNS order
    columns = columns if task == 'analysis' else sorted(columns)
    common = [c for c in columns if all(c in row for row in rows.values())]
    if task == 'linear' and common:
        for row in rows.values():
            row['mean'] = sum(row[d] for d in common) / len(common)
            row['avg rank'] = sum(rank(row[d], [o[d] for o in rows.values()]) for d in common) / len(common)
        columns += ['mean', 'avg rank']
    width, digits = max(len(n) for n in rows), 3 if task == 'analysis' else 2
    lines = [f'{task:<{width}} ' + ' '.join(f'{c:>9}' for c in columns)]
    for name, row in rows.items():
        cells = [f'{row[c]:{max(9, len(c))}.{digits}f}' if c in row else f'{"-":>{max(9, len(c))}}' for c in columns]
        lines.append(f'{name:<{width}} ' + ' '.join(cells))
    footer = f'mean and avg rank over {", ".join(common)} (top1: top-1 accuracy, mpc: mean per-class accuracy, in %)'
    return '\n'.join(lines + ([footer] if task == 'linear' else []))


def summary(path):
    """One table per task of the latest result per (checkpoint hash, task, data set, metric)."""
    if not os.path.isfile(path):
        fail(f'no results file at {path}; run eval_linear.py on a checkpoint first, or give --results FILE')
    latest, bad = {}, 0
    with open(path, errors='replace') as f:
        for line in f:
            try:
                latest |= cell(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
    tables = {}
    for (_, task, name, column), value in latest.items():
        tables.setdefault(task, {}).setdefault(name, {})[column] = value
    skipped = [f'skipped {bad} unreadable lines of {path}'] if bad else []
    if not tables:
        fail(f'no readable results in {path}{" (" + skipped[0] + ")" if bad else ""}; run eval_linear.py first')
    return '\n\n'.join([table(task, rows) for task, rows in tables.items()] + skipped)


def cell(r):
    """{(checkpoint hash, task, row name, column): value} of one result; a probe's column is (data set, metric)."""
    if r['task'] == 'analysis':
        return {(r['ckpt_sha256'], 'analysis', f'{r["name"]} on {r["dataset"]}', k): float(r[k])
                for k in ANALYSIS_COLUMNS if k in r}
    column = f'{r["dataset"]}/{"mpc" if r.get("metric") == "mean-per-class" else "top1"}'
    return {(r['ckpt_sha256'], r['task'], r['name'], column): 100 * float(r['accuracy'])}


def readable(r):
    """The result's main numbers on one line, accuracies in %."""
    cells = [f'{k} {100 * r[k]:.2f}%' if k in ('accuracy', 'val_accuracy', 'ci95') else
             f'{k} {r[k]:.4g}' if isinstance(r[k], float) else f'{k} {r[k]}' for k in SHOWN if k in r]
    return f'{r["name"]} on {r["dataset"]}, {r["task"]}: ' + ', '.join(cells)


def main(argv=None):
    args = get_args(argv)
    if args.summary:
        return print(summary(args.results))
    net, size, norm, ckpt = load_encoder(args.ckpt, args.pretrain_data)
    path = os.path.realpath(args.ckpt)
    digest = sha256(path)
    result = {'name': f'{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)} {digest[:8]}',
              'dataset': args.dataset, 'image_size': size, 'norm': norm}
    if args.analyze:
        result |= {'task': 'analysis', **analyze(args, net, size, norm, ckpt)}
    elif args.few_shot:
        f, y = few_shot_pool(args.dataset, features(args, net, size, norm))
        result |= {'task': f'5-way {args.few_shot}-shot', 'episodes': args.episodes, 'pool': len(y),
                   **few_shot(f, y, args.few_shot, args.episodes, args.device)}
    else:
        metric = args.metric or ('mean-per-class' if args.dataset in MEAN_PER_CLASS else 'top1')
        feats = features(args, net, size, norm)
        result |= {'task': 'linear', 'metric': metric,
                   **linear_probe(feats, args.dataset, metric == 'mean-per-class', args.device)}
    result |= {'ckpt': path, 'ckpt_sha256': digest, 'data_dir': os.path.realpath(args.data_dir), 'args': vars(args)}
    print(readable(result))
    with open(args.results, 'a') as f:
        f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
    main()
