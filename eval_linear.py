"""Transfer probing and analysis of a pretrained encoder (the paper's protocol, after AugSelf).
  linear probe:  python eval_linear.py --ckpt out/ckpt.pt --dataset cifar10
  few-shot:      python eval_linear.py --ckpt out/ckpt.pt --dataset cub200 --data-dir ~/data/cub200 --few-shot 5
  analysis:      python eval_linear.py --ckpt out/ckpt.pt --dataset stl10 --analyze
  the table:     python eval_linear.py --summary"""
import hashlib
import json
import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import data
from data import TORCHVISION, WORKERS, fail
from model import EMBED, Shift, restore
# AugSelf's validation hold-outs (ImageNet-100's: the STAR authors'): (train, val) sizes and the seed of random_split
HOLD_OUT = {'cifar10': (45000, 5000, 43), 'cifar100': (45000, 5000, 44), 'food101': (68175, 7575, 42),
            'pets': (2940, 740, 49), 'cars': (6494, 1650, 45), 'mit67': (4690, 670, 51), 'stl10': (4500, 500, 50),
            'imagenet100': (114020, 12669, 12)}
MEAN_PER_CLASS = {'pets', 'flowers102', 'caltech101', 'aircraft'}
WEIGHTS = torch.logspace(-6, 5, 45)  # the L2 weights w searched on the validation split
SAMPLE = 5000  # training images the analysis fits its frozen predictor on: a seeded sample, the same for every run
ANALYSIS_COLUMNS = ['cca', 'mrr', 'hit1', 'hit5', 'pre', 'frozen_mrr', 'frozen_hit1', 'frozen_hit5', 'frozen_pre']
SHOWN = ['accuracy', 'ci95', 'metric', 'w', 'val_accuracy', 'splits', 'episodes', 'pool', 'sample',
         *ANALYSIS_COLUMNS, 'routing_png']


def get_args(argv=None):
    p = data.parser(__doc__)
    p.add_argument('--ckpt', help="train.py's ckpt.pt or encoder.pt, or an official checkpoint ({'backbone': ...})")
    p.add_argument('--dataset', help=f'stl10, imagenet100, sun397, {", ".join(TORCHVISION)}; any other name is an '
                                     'image folder (--data-dir with train/, test/ of class folders: mit67, cars, ...)')
    p.add_argument('--data-dir', help='torchvision root (downloads go there) or image folder (data if not given)')
    p.add_argument('--few-shot', type=int, metavar='K', help='5-way K-shot episodes instead of the linear probe')
    p.add_argument('--episodes', type=int, help='few-shot episodes (2000 if not given)')
    p.add_argument('--analyze', action='store_true', help='equivariance of the frozen features; of a ckpt.pt with an '
                   'equivariant head also CCA, its predictor, routing; of STAR\'s, routing-*.png beside --results')
    p.add_argument('--summary', action='store_true', help='print the tables of the results in --results')
    p.add_argument('--results', default='results.jsonl', help='every run appends a JSON line here')
    args = p.parse_args(argv)
    data.require(args, {'few_shot': 1, 'episodes': 1})
    check_task(args)
    args.data_dir = args.data_dir or 'data'
    args.episodes = args.episodes or (2000 if args.few_shot else None)
    return args


def check_task(args):
    """Refuse, before any work, what cannot run to the end: a missing flag, a flag that cannot act, a --results that
    cannot take the result."""
    task = ('--summary' if args.summary else '--analyze' if args.analyze else '--few-shot' if args.few_shot else
            'the linear probe')
    acts = {'ckpt': task != '--summary', 'dataset': task != '--summary', 'data_dir': task != '--summary',
            'analyze': task == '--analyze', 'few_shot': task == '--few-shot', 'episodes': task == '--few-shot'}
    for flag in [f for f, used in acts.items() if not used and getattr(args, f) not in (None, False)]:
        fail(f'--{flag.replace("_", "-")} has no effect with {task}: drop it')
    if task != '--summary' and not (args.ckpt and args.dataset):
        fail('give --ckpt and --dataset (or --summary)')
    if args.analyze and 'all' in TORCHVISION.get(args.dataset, (None, {}))[1]:
        fail(f'--analyze fits on a train split and scores on a test split; {args.dataset} has no official ones')
    with open(args.results, 'r' if task == '--summary' else 'a+', errors='replace') as f:  # as the task will (OSError)
        f.seek(0)
        if f.read(1) not in ('', '{'):  # a ckpt.pt, say: a line appended would change its hash
            fail(f'--results {args.results} is not a file of JSON lines: give another file (it was left as it is)')


def features(args, net, size, norm):
    """{split: (features, labels)} of the frozen encoder, each split encoded batch by batch as its loader reads it."""
    out = {}
    for split in TORCHVISION[args.dataset][1] if args.dataset in TORCHVISION else ['train', 'test']:
        batches = data.loader(data.labelled(args.dataset, args.data_dir, split, size), WORKERS)
        f, y = data.encode(net.to(args.device), batches, norm, torch.device(args.device))
        # AugSelf's Food-101 order: class by class as in meta/classes.txt (alphabetical), each in SPLIT.json's
        order = y.argsort(stable=True) if args.dataset == 'food101' else torch.arange(len(y))
        out[split] = f[order], y[order]
    return out


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
        n_val = max(1, len(feats['train'][1]) * n_val // (n_train + n_val))
        f, y = feats['train']
        i = torch.utils.data.random_split(range(len(y)), [len(y) - n_val, n_val], torch.Generator().manual_seed(seed))
        feats['train'], feats['val'] = ((f[s.indices], y[s.indices]) for s in i)
    return feats['train'], feats['val'], feats['test']


def minimise(loss, theta):
    """theta minimising loss(theta) by full-batch L-BFGS, as AugSelf runs it."""
    theta = theta.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=5000, tolerance_grad=1e-10, tolerance_change=0,
                            line_search_fn='strong_wolfe')

    def closure():
        value = loss(theta)
        theta.grad = torch.autograd.grad(value, theta)[0]
        return value
    opt.step(closure)
    return theta.detach()


def logistic_regression(x, y, n_classes, w, init=None):
    """AugSelf's probe: summed cross-entropy + w ||theta||^2 (bias included: x's last feature is 1); theta is d x C."""
    init = x.new_zeros(x.shape[1], n_classes) if init is None else init
    return minimise(lambda t: F.cross_entropy(x @ t, y, reduction='sum') + w * t.pow(2).sum(), init)


def one_vs_rest(x, y, n_classes):
    """scikit-learn's LogisticRegression(solver='liblinear'), C = 1, for E episodes (x: E x n x d) at once: per
    class, 1/2 ||[theta; b]||^2 + sum log(1 + exp(-y (theta x + b))), y = +-1; x's last feature is 1 (the bias b).
    Returns E x d x C."""
    y_c = 2 * F.one_hot(y, n_classes).float() - 1
    init = x.new_zeros(x.shape[0], x.shape[-1], n_classes)
    return minimise(lambda t: t.pow(2).sum() / 2 + F.softplus(-y_c * (x @ t)).sum(), init)


def accuracy(pred, y, per_class):
    """Top-1 accuracy, or with per_class the mean over the classes of y of each one's accuracy."""
    groups = [y == c for c in y.unique()] if per_class else [torch.ones_like(y, dtype=torch.bool)]
    return torch.stack([(pred[g] == y[g]).float().mean() for g in groups]).mean().item()


def linear_probe(feats, name, per_class, device):
    """Choose w on val (each fit warm-started from the last), refit on train + val, report test (after AugSelf)."""
    splits = probe_splits(name, feats)  # each with the bias as a last feature of 1
    (xt, yt), (xv, yv), (xs, ys) = ((F.pad(x, (0, 1), value=1).to(device), y.to(device)) for x, y in splits)
    if len(torch.cat([yt, yv]).unique()) < 2:  # one class would score 100%
        fail(f'{name}: a linear probe needs two classes or more; its training split holds one class or none')
    n_classes, theta, scores = int(max(yt.max(), yv.max(), ys.max())) + 1, None, []
    for w in tqdm(WEIGHTS.tolist(), desc='choosing w on val', leave=False):
        theta = logistic_regression(xt, yt, n_classes, w, theta)
        scores.append((accuracy((xv @ theta).argmax(-1), yv, per_class), w, theta))
    best, w, theta = max(scores, key=lambda s: s[0])  # the first w of the best validation accuracy
    theta = logistic_regression(torch.cat([xt, xv]), torch.cat([yt, yv]), n_classes, w, theta)
    return {'accuracy': accuracy((xs @ theta).argmax(-1), ys, per_class), 'val_accuracy': best, 'w': w,
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
    return (torch.cat(support).view(n, -1), torch.cat(query).view(n, -1),
            torch.arange(ways).repeat_interleave(k), torch.arange(ways).repeat_interleave(queries))


def few_shot(feats, name, k, n, device, queries=16, chunk=100):
    """Mean accuracy and 95% interval (1.96 std / sqrt(n)) of n 5-way k-shot episodes, `chunk` fitted at once, drawn
    from AugSelf's episode pool: the test split for FC100, every split for the others (CUB-200: train + test)."""
    pool = ['test'] if name == 'fc100' else list(feats)
    f, y = (torch.cat([feats[s][j] for s in pool]) for j in (0, 1))
    support, query, ys, yq = episodes(y, n, k, queries)
    f, acc = F.pad(f, (0, 1), value=1).to(device), []  # the bias as a last feature of 1
    for s, q in zip(support.split(chunk), query.split(chunk)):
        theta = one_vs_rest(f[s], ys.expand(len(s), -1).to(device), 5)
        acc.append(((f[q] @ theta).argmax(-1) == yq.to(device)).float().mean(1).cpu())
    acc = torch.cat(acc)
    return {'accuracy': acc.mean().item(), 'ci95': 1.96 * acc.std(correction=0).item() / n ** 0.5, 'pool': len(y)}


def cca(cov, k, ridge=1e-6):
    """Canonical correlations, largest first, of x (the first k dimensions of a joint covariance) and y (the rest):
    singular values of Cxx^-1/2 Cxy Cyy^-1/2 (ridged)."""
    def inv_sqrt(c):
        e, v = torch.linalg.eigh(c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype))
        return v @ torch.diag(e.rsqrt()) @ v.T
    return torch.linalg.svdvals(inv_sqrt(cov[:k, :k]) @ cov[:k, k:] @ inv_sqrt(cov[k:, k:]))


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


@torch.no_grad()
def view_features(net, ds, indices, norm, stats, device, views=16, chunk=16, seed=0):
    """Batches (h(x0): B x d, h(v): B x views x d, standardised a: B x views x 11) of the images `indices` of ds,
    `chunk` at a time, their views made as training makes them (data.make_views): items (i, key) of ds (Images) made
    in its workers, one colour order per view batch, the run's statistics."""
    g, keys = data.generator(seed), range(views // 2)  # two views an item
    batches = [[(i, (seed, i, k)) for i in b.tolist() for k in keys] for b in indices.split(chunk)]
    for batch in tqdm(data.loader(ds, WORKERS, batches), 'views', len(batches), leave=False):
        x0, v1, v2, a1, a2 = data.make_views(*(t.to(device) for t in batch), data.jitter_orders(g), norm, stats)
        b = len(x0) // len(keys)
        h = net(torch.cat([x0[::len(keys)], torch.stack([v1, v2], 1).flatten(0, 1)])).cpu()
        yield h[:b], h[b:].view(b, views, -1), torch.stack([a1, a2], 1).view(b, views, -1).cpu()


@torch.no_grad()
def score(batches, predictor, model):
    """Means over streamed test batches: the frozen predictor's ranking and, for a model with an equivariant head, its
    own predictor's ranking, each router's weights, and the first two moments of z = [z_inv, z_eq], whose covariance
    gives the CCA of the two embeddings."""
    sums, n = {}, 0
    for h0, h_v, a in batches:
        b, m = h_v.shape[:2]
        a = a.flatten(0, 1)
        h_hat = predictor(h0.repeat_interleave(m, 0), a).view(b, m, -1)
        means = {f'frozen_{k}': v for k, v in equivariance(h_hat, h_v).items()}
        if model:
            e, e_v = model.heads(h0), model.heads(h_v.flatten(0, 1))
            z_hat = model.shift(e['z_eq'].repeat_interleave(m, 0), a).view(b, m, -1)
            z = torch.cat([e['z_inv'], e['z_eq']], 1).double()
            means |= equivariance(z_hat, e_v['z_eq'].view(b, m, -1))
            means |= {'routing_inv': e['s_inv'].mean(0), 'routing_eq': e['s_eq'].mean(0), 'z': z.mean(0),
                      'zz': z.T @ z / b}
        sums = {k: sums.get(k, 0) + v * b for k, v in means.items()}
        n += b
    out = {k: v / n for k, v in sums.items()}
    if model:
        cov = out.pop('zz') - out['z'].outer(out.pop('z'))
        out['cca'] = cca(cov, EMBED).mean().item()
    return {k: v.tolist() if torch.is_tensor(v) else v for k, v in out.items()}


def analyze(args, net, size, norm, model, ckpt, views=16):
    """Equivariance of any encoder's frozen features: a predictor fitted on a seeded sample of SAMPLE training images
    ranks each test view among `views` views of its image; `score` streams the test split. Views come from the files
    as training's do (x0 resized as training resizes it), standardised with the run's statistics (computed from the
    data as training would if the checkpoint has none). `model`: a train.py model, scored if it has an equivariant
    head."""
    model = model.eval() if model is not None and model.equivariant else None
    train_ds, test_ds = (data.labelled(args.dataset, args.data_dir, s, size, TF.InterpolationMode.BILINEAR)
                         for s in ('train', 'test'))
    if model and len(test_ds) <= 2 * EMBED:  # else the covariance of [z_inv, z_eq] is singular: some correlations are 1
        fail(f'the CCA of z_inv and z_eq needs more than {2 * EMBED} test images; {args.dataset} has {len(test_ds)}')
    stats = data.run_stats(train_ds, ckpt.get('stats'))
    net, g = net.to(args.device).eval(), data.generator(0)
    sample = torch.randperm(len(train_ds), generator=g)[:SAMPLE]
    h0, h_v, a = (torch.cat(t) for t in zip(*view_features(net, train_ds, sample, norm, stats, args.device, views)))
    frozen = fit_predictor(h0, h_v, a)  # the predictor of the frozen features
    test = view_features(net, test_ds, torch.randperm(len(test_ds), generator=g), norm, stats, args.device, views)
    return {'views': views, 'sample': len(sample), 'stats': torch.stack(stats).tolist(), **score(test, frozen, model)}


def draw_routing(result):
    """The picture result['routing_png'] of an analysis's routing: a row per expert, each router's mean weight (blue:
    s_inv, orange: s_eq) written and drawn as a bar 450 px long for a weight of 1, a black line at the uniform 1/N;
    titled with the checkpoint, the data set and its folder."""
    n = len(result['routing_inv'])
    img = Image.new('RGB', (640, 44 + 30 * n), 'white')
    draw = ImageDraw.Draw(img)
    draw.multiline_text((10, 4), f'{result["name"]} on {result["dataset"]} ({result["data_dir"]})\nmean routing '
                        f'weight per expert over the test images; black line: uniform 1/{n}', fill='black')
    for k in range(n):
        for j, (task, colour) in enumerate([('inv', (31, 119, 180)), ('eq', (255, 127, 14))]):
            y, w = 40 + 30 * k + 13 * j, result[f'routing_{task}'][k]
            draw.text((10, y), f'expert {k + 1} s_{task} {w:.3f}', fill='black')
            draw.rectangle([150, y, 150 + 450 * w, y + 10], fill=colour)
    draw.line([150 + 450 / n, 36, 150 + 450 / n, 36 + 30 * n], fill='black')
    img.save(result['routing_png'])


def rank(value, values):
    return sum(v > value for v in values) + (sum(v == value for v in values) + 1) / 2


def table(task, rows):
    """Rows {checkpoint: {column: value}} as text, columns in ANALYSIS_COLUMNS order or sorted (data set/metric); a
    linear probe adds the mean and average rank (ties share) over the data sets every row has."""
    columns = sorted(set().union(*rows.values()), key=ANALYSIS_COLUMNS.index if task == 'analysis' else None)
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
    """One table per task of the latest result per row (a checkpoint, named with its hash) and column."""
    tables, bad = {}, 0
    with open(path, errors='replace') as f:
        for line in f:
            try:
                for (task, name, column), value in cells(json.loads(line)).items():
                    tables.setdefault(task, {}).setdefault(name, {})[column] = value
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
    skipped = [f'skipped {bad} unreadable lines of {path}'] if bad else []
    return '\n\n'.join([table(task, rows) for task, rows in tables.items()] + skipped) or f'{path} holds no results'


def cells(r):
    """{(task, row, column): value} of one result; a probe's column is its data set and metric."""
    if r['task'] == 'analysis':
        return {('analysis', f'{r["name"]} on {r["dataset"]}', k): float(r[k]) for k in ANALYSIS_COLUMNS if k in r}
    column = f'{r["dataset"]}/{"mpc" if r.get("metric") == "mean-per-class" else "top1"}'
    return {(r['task'], r['name'], column): 100 * float(r['accuracy'])}


def readable(r):
    """The result's main numbers on one line, accuracies in %."""
    cells = [f'{k} {100 * r[k]:.2f}%' if k in ('accuracy', 'val_accuracy', 'ci95') else
             f'{k} {r[k]:.4g}' if isinstance(r[k], float) else f'{k} {r[k]}' for k in SHOWN if k in r]
    return f'{r["name"]} on {r["dataset"]}, {r["task"]}: ' + ', '.join(cells)


def main(argv=None):
    args = get_args(argv)
    if args.summary:
        return print(summary(args.results))
    net, size, norm, model, ckpt = restore(args.ckpt)
    path, data_dir = os.path.realpath(args.ckpt), os.path.realpath(args.data_dir)
    with open(path, 'rb') as f:
        digest = hashlib.file_digest(f, 'sha256').hexdigest()
    result = {'name': f'{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)} {digest[:8]}',
              'dataset': args.dataset, 'image_size': size, 'norm': norm}
    if args.analyze:
        result |= {'task': 'analysis', **analyze(args, net, size, norm, model, ckpt)}
    elif args.few_shot:
        result |= {'task': f'5-way {args.few_shot}-shot', 'episodes': args.episodes,
                   **few_shot(features(args, net, size, norm), args.dataset, args.few_shot, args.episodes, args.device)}
    else:
        per_class = args.dataset in MEAN_PER_CLASS
        result |= {'task': 'linear', 'metric': 'mean-per-class' if per_class else 'top1',
                   **linear_probe(features(args, net, size, norm), args.dataset, per_class, args.device)}
    result |= {'ckpt': path, 'ckpt_sha256': digest, 'data_dir': data_dir, 'args': vars(args)}
    if args.analyze and model and model.heads.routed:  # named by what it shows: checkpoint, data set, data folder
        shown = hashlib.sha256(f'{args.dataset}\n{data_dir}'.encode(errors='surrogateescape')).hexdigest()[:8]
        result['routing_png'] = os.path.join(os.path.dirname(args.results), f'routing-{digest[:8]}-{shown}.png')
    with open(args.results, 'a') as f:  # the result is kept before anything is printed or drawn
        f.write(json.dumps(result) + '\n')
    print(readable(result))
    if 'routing_png' in result:
        draw_routing(result)


if __name__ == '__main__':
    main()
