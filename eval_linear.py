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
from tqdm import tqdm

import data
import train
from data import fail
from model import STAR, encoder

# name: (torchvision class, keyword arguments of each official split); 'all' marks a data set with no official split
TORCHVISION = {
    'cifar10': (D.CIFAR10, {'train': {'train': True}, 'test': {'train': False}}),
    'cifar100': (D.CIFAR100, {'train': {'train': True}, 'test': {'train': False}}),
    'food101': (D.Food101, {'train': {'split': 'train'}, 'test': {'split': 'test'}}),
    'flowers102': (D.Flowers102, {s: {'split': s} for s in ['train', 'val', 'test']}),
    'pets': (D.OxfordIIITPet, {'train': {'split': 'trainval'}, 'test': {'split': 'test'}}),
    'dtd': (D.DTD, {s: {'split': s, 'partition': 1} for s in ['train', 'val', 'test']}),
    'caltech101': (D.Caltech101, {'all': {}}),
    'cars': (D.StanfordCars, {'train': {'split': 'train'}, 'test': {'split': 'test'}}),
    'aircraft': (D.FGVCAircraft, {s: {'split': s} for s in ['train', 'val', 'test']}),
    'sun397': (D.SUN397, {'all': {}}),
}
VAL_SHARE = {'pets': (740, 3680), 'cars': (1650, 8144), 'mit67': (670, 5360)}  # val / train images; 1 in 10 otherwise
MEAN_PER_CLASS = {'pets', 'flowers102', 'caltech101', 'aircraft'}
WEIGHTS = torch.logspace(-6, 5, 45)  # the L2 weights w searched on the validation split


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', help="train.py's ckpt.pt, its encoder.pt, or an official STAR/AugSelf checkpoint ({'backbone': ...})")
    p.add_argument('--dataset', help=f'stl10, {", ".join(TORCHVISION)}; any other name is an image folder '
                                     '(--data-dir with train/ and test/ sub-folders of class folders, e.g. mit67)')
    p.add_argument('--data-dir', default='data', help='torchvision root of the data set (downloads there when online), or the image folder (default: %(default)s)')
    p.add_argument('--metric', choices=['top1', 'mean-per-class'], help='default: mean-per-class for pets, flowers102, caltech101, aircraft; top1 otherwise')
    p.add_argument('--few-shot', type=int, metavar='K', help='5-way K-shot episodes on the test split instead of the linear probe')
    p.add_argument('--episodes', type=int, default=2000, help='few-shot episodes (default: %(default)s)')
    p.add_argument('--analyze', action='store_true', help='redundancy (CCA), equivariance and routing of a train.py ckpt.pt, on the test split')
    p.add_argument('--summary', action='store_true', help='print the table of linear-probe results in --results')
    p.add_argument('--results', default='results.jsonl', help='every run appends one JSON line here (default: %(default)s)')
    p.add_argument('--cache-dir', default='.cache/features', help='encoder features per (checkpoint, data set, split) (default: %(default)s)')
    p.add_argument('--image-size', type=int, help='input size for encoders without train.py arguments (default: 96)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda or cuda:N (default: %(default)s)')
    args = p.parse_args(argv)
    train.check_device(args.device)
    if not args.summary and not (args.ckpt and args.dataset):
        fail('give --ckpt and --dataset (or --summary)')
    return args


def load_encoder(path, image_size=None):
    """(encoder, image size, normalisation) from any of the three checkpoint layouts."""
    ckpt = train.load_checkpoint(path)
    size, norm, state = 96, data.STL10_NORM, ckpt
    if 'model' in ckpt and 'args' in ckpt:  # train.py's ckpt.pt
        size, norm = ckpt['args']['image_size'], ckpt['norm']
        state = {k.removeprefix('encoder.'): v for k, v in ckpt['model'].items() if k.startswith('encoder.')}
    elif 'backbone' in ckpt:  # the official STAR / AugSelf layout
        state = ckpt['backbone']
    state = {k.removeprefix('module.'): v for k, v in state.items() if not k.startswith('fc.')}
    net, _ = encoder('resnet50' if 'layer1.0.conv3.weight' in state else 'resnet18')
    try:
        net.load_state_dict(state)
    except RuntimeError:
        fail(f'{path} holds no torchvision ResNet-18/50 encoder (expected train.py output or {{"backbone": state_dict}})')
    return net, image_size or size, norm


def load_split(name, root, split, size):
    """uint8 images (N x 3 x size x size), resized (bicubic) and centre-cropped, and labels of one official split."""
    if name == 'stl10':
        return data.stl10(root, split, size)
    if name not in TORCHVISION:
        x, y, _ = data.image_folder(os.path.join(root, split), size)
        return x, y
    cls, kwargs = TORCHVISION[name]
    try:
        ds = cls(root, **kwargs.get(split, kwargs.get('all')), transform=functools.partial(data.pil_to_uint8, size=size), download=True)
    except Exception as e:
        fail(f'{name} ({split}) not found in {root} and the download failed ({type(e).__name__}); '
             f'place the files where torchvision.datasets.{cls.__name__}(root="{root}") expects them')
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=min(8, os.cpu_count()))
    batches = list(tqdm(loader, desc=f'loading {name} {split}', leave=False))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def features(args, net, size, norm):
    """{split: (features, labels)} of the official splits, encoded once and cached under the checkpoint's hash."""
    with open(args.ckpt, 'rb') as f:
        key = hashlib.file_digest(f, 'sha256').hexdigest()[:16]
    splits = ['train', 'test'] if args.dataset == 'stl10' or args.dataset not in TORCHVISION else list(TORCHVISION[args.dataset][1])
    out = {}
    for split in splits:
        path = os.path.join(args.cache_dir, f'{args.dataset}-{split}-{size}-{key}.pt')
        if not os.path.exists(path):
            x, y = load_split(args.dataset, args.data_dir, split, size)
            os.makedirs(args.cache_dir, exist_ok=True)
            train.save((train.encode(net.to(args.device), x, norm, torch.device(args.device)), y), path)
        out[split] = torch.load(path, weights_only=True)
    return out


def hold_out(f, y, n, seed=0):
    """Split (f, y) into a seeded random remainder and n held-out rows."""
    i = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return (f[i[n:]], y[i[n:]]), (f[i[:n]], y[i[:n]])


def probe_splits(name, feats):
    """(train, val, test) with the fixed splits of the protocol (STL-10 4500/500, CIFAR 45000/5000, Food-101 68175/7575,
    Pets 2940/740, Cars 6494/1650, MIT-67 4690/670); (ours) 20% test where no split exists, 10% val by default."""
    if 'all' in feats:
        feats['train'], feats['test'] = hold_out(*feats['all'], len(feats['all'][1]) // 5)
    if 'val' not in feats:
        val, total = VAL_SHARE.get(name, (1, 10))
        feats['train'], feats['val'] = hold_out(*feats['train'], len(feats['train'][1]) * val // total)
    return feats['train'], feats['val'], feats['test']


def fit(x, y, n_classes, w, init=None):
    """Multinomial logistic regression with bias on x (E x n x d: E independent problems), minimising
    summed cross-entropy + w ||weights||^2 with full-batch L-BFGS (strong Wolfe). Returns E x (d+1) x C."""
    x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    theta = (init.clone() if init is not None else x.new_zeros(x.shape[0], x.shape[-1], n_classes)).requires_grad_()
    opt = torch.optim.LBFGS([theta], max_iter=5000, tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy((x @ theta).flatten(0, 1), y.flatten(), reduction='sum') + w * theta[:, :-1].pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach()


def predict(theta, x):
    return (torch.cat([x, torch.ones_like(x[..., :1])], -1) @ theta).argmax(-1)


def accuracy(pred, y, per_class):
    if not per_class:
        return (pred == y).float().mean().item()
    return torch.stack([(pred[y == c] == c).float().mean() for c in y.unique()]).mean().item()


def linear_probe(feats, name, per_class, device):
    """Choose w on val (warm-starting each fit from the last), refit on train + val, report test (the paper's protocol, after AugSelf)."""
    (xt, yt), (xv, yv), (xs, ys) = (tuple(t.to(device) for t in s) for s in probe_splits(name, feats))
    n_classes, theta, scores = int(max(yt.max(), yv.max(), ys.max())) + 1, None, []
    for w in tqdm(WEIGHTS.tolist(), desc='choosing w on val', leave=False):
        theta = fit(xt[None], yt[None], n_classes, w, theta)
        scores.append((accuracy(predict(theta[0], xv), yv, per_class), w, theta))
    best, w, theta = max(scores, key=lambda s: s[0])
    theta = fit(torch.cat([xt, xv])[None], torch.cat([yt, yv])[None], n_classes, w, theta)
    return {'accuracy': accuracy(predict(theta[0], xs), ys, per_class), 'val_accuracy': best, 'w': w}


def episodes(labels, n, k, queries, ways=5, seed=0):
    """n few-shot episodes: support (n x ways*k) and query (n x ways*queries) indices, episode labels 0..ways-1."""
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in labels.unique()]
    by_class = [i for i in by_class if len(i) >= k + queries]
    if len(by_class) < ways:
        fail(f'{ways}-way {k}-shot needs {ways} classes with {k + queries} test images each; this data set has {len(by_class)}')
    support, query = [], []
    for _ in range(n):
        picked = [by_class[c][torch.randperm(len(by_class[c]), generator=g)[:k + queries]] for c in torch.randperm(len(by_class), generator=g)[:ways]]
        support.append(torch.cat([i[:k] for i in picked]))
        query.append(torch.cat([i[k:] for i in picked]))
    return torch.stack(support), torch.stack(query), torch.arange(ways).repeat_interleave(k), torch.arange(ways).repeat_interleave(queries)


def few_shot(f, y, k, n, device, queries=16, chunk=100):
    """Mean accuracy and 95% interval over n 5-way k-shot episodes; logistic regression with w = 0.5
    (scikit-learn's default C = 1), fitted for `chunk` episodes at once."""
    support, query, ys, yq = episodes(y, n, k, queries)
    f, acc = f.to(device), []
    for s, q in zip(support.split(chunk), query.split(chunk)):
        theta = fit(f[s], ys.expand(len(s), -1).to(device), 5, 0.5)
        acc.append((predict(theta, f[q]) == yq.to(device)).float().mean(1).cpu())
    acc = torch.cat(acc)
    return {'accuracy': acc.mean().item(), 'ci95': 1.96 * acc.std().item() / math.sqrt(n)}


def cca(x, y, ridge=1e-6):
    """Mean canonical correlation between paired rows of x and y: singular values of Cxx^-1/2 Cxy Cyy^-1/2, with a
    ridge of `ridge` times the mean variance added to Cxx and Cyy for stability."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)

    def inv_sqrt(c):
        e, v = torch.linalg.eigh(c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype))
        return v @ torch.diag(e.rsqrt()) @ v.T
    return torch.linalg.svdvals(inv_sqrt(x.T @ x) @ (x.T @ y) @ inv_sqrt(y.T @ y)).mean().item()


@torch.no_grad()
def analyze(args):
    """Redundancy, equivariance and routing of a train.py checkpoint on held-out images (the paper's protocol, after AugSelf)."""
    ckpt = train.load_checkpoint(args.ckpt)
    if 'args' not in ckpt or ckpt['args']['eq_weight'] == 0:
        fail(f'--analyze needs a train.py ckpt.pt with an equivariant head; {args.ckpt} is not one')
    a, device = ckpt['args'], torch.device(args.device)
    model = STAR(a['arch'], a['heads'], a['experts'])
    model.load_state_dict(ckpt['model'])
    model.to(device).eval()
    images, _ = load_split(args.dataset, args.data_dir, 'test', a['image_size'])
    stats, g = data.param_stats(a['image_size']), torch.Generator().manual_seed(0)
    out = {k: [] for k in ['z_inv', 'z_eq', 'w_inv', 'w_eq', 'z_hat', 'target']}
    for x in tqdm(images.split(256), desc='analysing', leave=False):
        p, order = (t.view(2, len(x), -1) for t in data.sample(2 * len(x), a['image_size'], g))
        x0, v1, v2, a1, a2 = data.make_views(x.to(device), p, order, ckpt['norm'], stats)
        (z_inv, z_eq), (w_inv, w_eq) = model.heads(model.encoder(x0))
        targets = [model.heads(model.encoder(v))[0][1] for v in (v1, v2)]
        for key, v in zip(out, [z_inv, z_eq, w_inv, w_eq, torch.cat([model.predict(z_eq, a1), model.predict(z_eq, a2)]), torch.cat(targets)]):
            out[key].append(v.float().cpu())
    out = {k: torch.cat(v) for k, v in out.items()}
    gallery, z_hat = F.normalize(out['target'], dim=1), F.normalize(out['z_hat'], dim=1)
    rank = torch.cat([((q @ gallery.T) > (q * t).sum(1, keepdim=True)).sum(1) + 1
                      for q, t in zip(z_hat.split(1024), gallery.split(1024))]).float()
    use_inv, use_eq = out['w_inv'].mean(0), out['w_eq'].mean(0)
    uniform = 1 / len(use_inv)
    return {'cca': cca(out['z_inv'], out['z_eq']), 'mrr': (1 / rank).mean().item(), 'hit1': (rank <= 1).float().mean().item(),
            'hit5': (rank <= 5).float().mean().item(), 'gallery': len(gallery),
            'rel_error': ((out['z_hat'] - out['target']).norm(dim=1) / out['target'].norm(dim=1)).mean().item(),
            'routing_inv': use_inv.tolist(), 'routing_eq': use_eq.tolist(),
            'shared_experts': torch.nonzero((use_inv >= uniform) & (use_eq >= uniform)).flatten().tolist(),
            'inv_experts': torch.nonzero((use_inv >= uniform) & (use_eq < uniform)).flatten().tolist(),
            'eq_experts': torch.nonzero((use_inv < uniform) & (use_eq >= uniform)).flatten().tolist()}


def summary(path):
    """One row per checkpoint, one column per data set (latest linear-probe result), then the mean and average rank."""
    if not os.path.exists(path):
        fail(f'no results in {path}; run a linear probe first')
    table = {}
    with open(path) as f:
        for r in map(json.loads, f):
            if r['task'] == 'linear':
                table.setdefault(r['ckpt'], {})[r['dataset']] = 100 * r['accuracy']
    sets = sorted({d for row in table.values() for d in row})
    ranks = {c: [] for c in table}
    for d in sets:
        scores = {c: row[d] for c, row in table.items() if d in row}
        for c, s in scores.items():  # rank 1 is the best; ties share the mean of their ranks
            ranks[c].append(sum(t > s for t in scores.values()) + (sum(t == s for t in scores.values()) + 1) / 2)
    width = max([len(c) for c in table] + [10])
    lines = [f'{"checkpoint":<{width}} ' + ' '.join(f'{d[:9]:>9}' for d in sets) + '      mean  avg rank']
    for c, row in table.items():
        cells = ' '.join(f'{row[d]:9.2f}' if d in row else f'{"-":>9}' for d in sets)
        lines.append(f'{c:<{width}} {cells} {sum(row.values()) / len(row):9.2f} {sum(ranks[c]) / len(ranks[c]):9.2f}')
    return '\n'.join(lines)


def main(argv=None):
    args = get_args(argv)
    if args.summary:
        print(summary(args.results))
        return
    if args.analyze:
        result = {'task': 'analysis', **analyze(args)}
    else:
        net, size, norm = load_encoder(args.ckpt, args.image_size)
        feats = features(args, net, size, norm)
        if args.few_shot:
            f, y = feats['test'] if 'test' in feats else feats['all']
            result = {'task': f'5-way {args.few_shot}-shot', **few_shot(f, y, args.few_shot, args.episodes, args.device)}
        else:
            metric = args.metric or ('mean-per-class' if args.dataset in MEAN_PER_CLASS else 'top1')
            result = {'task': 'linear', 'metric': metric, **linear_probe(feats, args.dataset, metric == 'mean-per-class', args.device)}
    result = {'ckpt': args.ckpt, 'dataset': args.dataset, **result}
    print(json.dumps(result))
    with open(args.results, 'a') as f:
        f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
    main()
