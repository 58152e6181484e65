"""STAR pretraining. The paper's STL-10 recipe is the default: python train.py --dataset stl10
On G devices (DDP, SyncBatchNorm, negatives from all processes): torchrun --nproc_per_node=G train.py ..."""
import datetime
import fcntl
import json
import math
import os
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from data import fail
from losses import gather, nt_xent
from model import RUN_KEYS, STAR, load_checkpoint, save

# Flags a resumed run may change (each change is printed); every other flag must match the checkpoint's.
RESUMABLE = ('epochs', 'lr', 'wd', 'data_dir', 'out_dir', 'device', 'precision', 'eval_interval', 'save_every',
             'workers', 'resume', 'overwrite')
RUN_FILES = re.compile(r'(ckpt|encoder(-\d+)?)\.pt(\.tmp)?|log\.jsonl|views\.png')  # what a run writes


def get_args(argv=None):
    p = data.parser(__doc__)
    p.add_argument('--dataset', choices=['stl10', 'imagenet100', 'folder'], default='stl10', help='stl10: '
                   'train+unlabeled, 105k images (downloaded when online); imagenet100: 100 classes; folder: images')
    p.add_argument('--data-dir', default='data', help='holds stl10_binary/; or an ImageNet root (train/, val/ of '
                   'class-id folders); or the images, all below it or below its train/')
    p.add_argument('--out-dir', default='out', help='ckpt.pt (resumable), encoder.pt, log.jsonl, views.png')
    p.add_argument('--arch', choices=['resnet18', 'resnet50'], default='resnet18', help='torchvision encoder')
    p.add_argument('--heads', choices=['star', 'shared', 'separate', 'simclr'], default='star',
                   help='star: N soft-routed experts; shared: STAR-SS; separate: EquiMod; simclr: no equivariant task')
    p.add_argument('--experts', type=int, help='number of experts N of --heads star (16 if not given)')
    p.add_argument('--eq-weight', type=float, help='lambda in L = L_inv + lambda L_eq (1 if not given)')
    p.add_argument('--tau', type=float, default=0.2, help='NT-Xent temperature of both losses')
    p.add_argument('--epochs', type=int, default=200, help='epochs; the cosine schedule spans all of them')
    p.add_argument('--save-every', type=int, default=10, help='keep encoder-EPOCH.pt every this many epochs; 0: never')
    p.add_argument('--batch-size', type=int, default=256, help='global batch, split over the processes')
    p.add_argument('--lr', type=float, default=0.03, help='SGD learning rate per 256 images (lr * batch / 256 is used)')
    p.add_argument('--wd', type=float, default=5e-4, help='weight decay on all parameters')
    p.add_argument('--image-size', type=int, help='side of x0 and the views (if not given: 96 for stl10, else 224)')
    p.add_argument('--workers', type=int, default=data.WORKERS, help='DataLoader processes that read and crop images')
    p.add_argument('--seed', type=int, default=0, help='initialisation, sample order and every augmentation follow it')
    p.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32', help='bf16: autocast the forward pass')
    p.add_argument('--eval-interval', type=int, default=10, help='epochs between 1-NN monitor runs; 0: never')
    run = p.add_mutually_exclusive_group()
    run.add_argument('--resume', action='store_true', help='continue the run in --out-dir from its ckpt.pt')
    run.add_argument('--overwrite', action='store_true', help='start afresh in an --out-dir that holds a run')
    args = p.parse_args(argv)
    for flag, acts in {'experts': args.heads == 'star', 'eq_weight': args.heads != 'simclr'}.items():
        if getattr(args, flag) is not None and not acts:
            fail(f'--{flag.replace("_", "-")} has no effect with --heads {args.heads}: drop it')
    data_dir = os.path.realpath(args.data_dir)
    if args.dataset == 'folder' and os.path.commonpath([os.path.realpath(args.out_dir), data_dir]) == data_dir:
        fail(f'--out-dir {args.out_dir} is inside --data-dir: its files would become training images; move it out')
    args.experts = (16 if args.experts is None else args.experts) if args.heads == 'star' else None
    args.image_size = data.PRETRAIN[args.dataset][0] if args.image_size is None else args.image_size
    args.eq_weight = (1.0 if args.eq_weight is None else args.eq_weight) if args.heads != 'simclr' else 0.0
    data.require(args, {'batch_size': 2, 'experts': 1, 'image_size': 1, 'epochs': 1, 'save_every': 0,
                        'eval_interval': 0, 'eq_weight': 0}, above=('tau',))
    return args


class CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU processes (gloo), which torch's own refuses: each process normalises the global batch,
    gathered with gradient, and keeps its own rows, as one process would. On GPUs nn.SyncBatchNorm is used."""

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim  # any input of 2 or more dimensions

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        return shard(super().forward(gather(x)), dist.get_rank(), dist.get_world_size())


def knn_top1(train, test):
    """1-nearest-neighbour accuracy with cosine similarity, of (features, labels) of the two splits."""
    (train, train_y), (test, test_y) = ((F.normalize(f, dim=1), y) for f, y in (train, test))
    nearest = torch.cat([(t @ train.T).argmax(1) for t in test.split(1024)])
    return (train_y[nearest] == test_y).float().mean().item()


def objective(net, batch, order, run, args):
    """L_inv and L_eq of one batch of training items (L_eq = 0 for SimCLR), and the forward pass's named parts."""
    views = data.make_views(*(t.to(run['device']) for t in batch), order, run['norm'], run['stats'])
    with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16'):
        out = net(*views)
    l_inv = nt_xent(*out['z_inv'], args.tau)
    l_eq = nt_xent(torch.cat(out['z_eq']), torch.cat(out['z_hat']), args.tau) if 'z_eq' in out else l_inv.new_zeros(())
    return l_inv, l_eq, out


def lr_at(args, epoch):
    """CosineAnnealingLR(T_max = epochs) from lr * batch / 256, stepped once per epoch, no warm-up."""
    return args.lr * args.batch_size / 256 * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))


def shard(x, rank, world):
    """This process's contiguous share of a global batch."""
    return x[rank * len(x) // world:(rank + 1) * len(x) // world]


def start_processes(args):
    """(world size, rank, device) of this process; under torchrun, joins the process group."""
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    device = torch.device(args.device)
    if world > 1:
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        if args.batch_size % world:
            fail(f'--batch-size {args.batch_size} must be divisible by the {world} processes')
    return world, rank, device


def open_run(args, rank):
    """The checkpoint to resume from (None for a new run). A run in --out-dir is never replaced by accident, and a
    resume refuses changed flags other than RESUMABLE ones, whose changes it prints."""
    path, files = os.path.join(args.out_dir, 'ckpt.pt'), run_files(args.out_dir)
    if files and not (args.resume or args.overwrite):
        fail(f'{args.out_dir} holds a run ({", ".join(files)}): continue it (--resume) or replace it (--overwrite)')
    if not args.resume:
        return None
    ckpt = load_checkpoint(path)  # FileNotFoundError: no epoch has ended
    if not RUN_KEYS <= ckpt.keys():
        fail(f'{path} is not a train.py checkpoint; use a new --out-dir or --overwrite')
    there, here = ckpt['args'], vars(args)
    changed = {k: (there.get(k), here.get(k)) for k in sorted({**there, **here}) if there.get(k) != here.get(k)}
    refused = ', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in changed.items() if k not in RESUMABLE)
    if refused:
        fail(f'--resume: {path} was trained with other flags ({refused}); pass its flags or use --overwrite')
    for k, (a, b) in changed.items():
        if k not in ('resume', 'overwrite') and rank == 0:
            print(f'--resume: {k} was {a}, now {b}')
    return ckpt


def own(out_dir):
    """Make --out-dir and hold the lock of its .lock file while this process lives (the system releases it however
    the process ends, and DataLoader workers do not inherit it): a second train.py on the folder ends in one line."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, '.lock'), 'a+')  # OSError names a folder a run cannot write in
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f'{out_dir} is in use by another train.py that is still running (pid {open(lock.name).read().strip()}); '
             f'wait for it to end, or choose another --out-dir')
    lock.truncate(0)
    print(os.getpid(), file=lock, flush=True)
    return lock


def run_files(out_dir):
    return sorted(f for f in os.listdir(out_dir) if RUN_FILES.fullmatch(f)) if os.path.isdir(out_dir) else []


def load_data(args):
    """The pretraining images (Images) and the labelled (train, test) splits of the 1-NN monitor (None for a
    folder)."""
    size, rank = args.image_size, int(os.environ.get('RANK', 0))
    splits = [] if args.dataset == 'folder' else ['train', 'test']
    monitor = [data.labelled(args.dataset, args.data_dir, s, size) for s in splits] or None
    if args.dataset == 'stl10':
        return data.Images(*data.stl10(args.data_dir, 'train+unlabeled', size), size), monitor
    if args.dataset == 'imagenet100':  # listed once: the monitor's train split is this one
        return data.Images(monitor[0].source, monitor[0].labels, size), monitor
    root = os.path.join(args.data_dir, 'train')
    root = root if os.path.isdir(root) else args.data_dir
    if root != args.data_dir and rank == 0:
        print(f'pretraining on {root} only: {args.data_dir} holds other splits beside it')
    return data.Images(*data.image_folder(root, ['']), size), monitor


def steps(n, args, start, rank, world):
    """The training items of every epoch from `start` on, step by step: this process's share of each global batch of
    a permutation drawn from (seed, epoch), each image's views keyed by (seed, epoch, its place in the permutation).
    Views thus differ from epoch to epoch, and a resumed run, or one over more processes, draws those of an
    uninterrupted one."""
    for epoch in range(start, args.epochs):
        perm = torch.randperm(n, generator=data.generator((args.seed, epoch))).tolist()
        for step in range(n // args.batch_size):
            slots = shard(range(step * args.batch_size, (step + 1) * args.batch_size), rank, world)
            yield [(perm[s], (args.seed, epoch, s)) for s in slots]


def step_orders(args, epoch, step):
    """The colour orders (2 x 4) of a step's two view batches, a function of (seed, epoch, step): a key of four numbers,
    so no view of the epoch (keyed by three) shares its stream."""
    return data.jitter_orders(data.generator((args.seed, epoch, step, 0)))


def stop(what, epoch, flag):
    """End a run that blew up, saying what is kept: the checkpoint of the last epoch, saved before this one."""
    fail(f'{what}; ' + (f'ckpt.pt keeps epoch {epoch}, nothing of this one: --resume with a lower {flag}' if epoch
                        else f'no epoch was saved: start afresh with --overwrite and a lower {flag}'))


def train_epoch(net, opt, batches, epoch, args, run):
    """One epoch of `batches` (the loader's, of steps); returns the mean loss terms, the learning rate and each
    router's mean weights."""
    rank, n = run['rank'], run['steps']
    sums, routing, lr = torch.zeros(2), 0, lr_at(args, epoch)
    opt.param_groups[0]['lr'] = lr  # the schedule: constant within an epoch (one group: every parameter)
    bar = tqdm(zip(range(n), batches), f'epoch {epoch + 1}/{args.epochs}', n, disable=rank > 0)
    for step, batch in bar:
        # forward (this process's share of the global batch) and the loss L = L_inv + lambda L_eq
        l_inv, l_eq, out = objective(net, batch, step_orders(args, epoch, step), run, args)
        loss = l_inv + args.eq_weight * l_eq
        # stop on a non-finite loss, before anything of this epoch is saved
        terms = gather(torch.stack([l_inv, l_eq, loss]).detach()[None]).mean(0).cpu()  # the mean over processes
        if not terms.isfinite().all():
            stop(f'non-finite loss at epoch {epoch + 1} step {step + 1} (L_inv {terms[0]:.4g}, L_eq {terms[1]:.4g}, '
                 f'L {terms[2]:.4g})', epoch, '--lr or --eq-weight' if args.eq_weight > 1 else '--lr')
        # update
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += terms[:2]
        routing = routing + torch.stack([out[s].detach().float().mean(0) for s in ('s_inv', 's_eq') if s in out]).cpu()
        bar.set_postfix(L_inv=f'{terms[0]:.3f}', L_eq=f'{terms[1]:.3f}')
    return {'loss_inv': sums[0].item() / n, 'loss_eq': sums[1].item() / n, 'lr': lr,
            'routing': dict(zip(['inv', 'eq'], (routing / n).tolist()))}


def main(argv=None):
    args = get_args(argv)
    world, rank, device = start_processes(args)
    with own(args.out_dir) if rank == 0 else open(os.devnull):  # the lock on --out-dir, held while the run goes on
        pretrain(args, open_run(args, rank), world, rank, device)
    if world > 1:
        dist.destroy_process_group()


def pretrain(args, ckpt, world, rank, device):
    start, history = (ckpt['epoch'], ckpt['log']) if ckpt else (0, [])
    if start >= args.epochs:
        return print(f'{args.out_dir}: the run is finished ({start} of {args.epochs} epochs); raise --epochs to go on')
    images, monitor = load_data(args)
    per_epoch = len(images) // args.batch_size
    if per_epoch == 0:
        fail(f'--batch-size {args.batch_size} is larger than the data set ({len(images)} images)')
    # the statistics that standardise a: a resumed run keeps those it started with, whatever --data-dir holds now
    kept = ckpt.get('stats') if ckpt else None
    run = {'rank': rank, 'device': device, 'norm': data.PRETRAIN[args.dataset][1],
           'stats': data.run_stats(images, kept), 'steps': per_epoch}

    # model, optimiser, and the state to resume from
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    bn = (torch.nn.SyncBatchNorm if device.type == 'cuda' else CPUSyncBatchNorm) if world > 1 else None
    model = STAR(args.arch, args.heads, args.experts, bn).to(device)
    model = model.to(memory_format=torch.channels_last) if device.type == 'cuda' else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    if ckpt:
        model.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optimizer'])
    net = DistributedDataParallel(model) if world > 1 else model
    batches = iter(data.loader(images, args.workers, steps(len(images), args, start, rank, world)))
    if rank == 0:
        prepare_out_dir(args, images)
        what = f'resuming from epoch {start} of {args.epochs}' if ckpt else f'starting a run of {args.epochs} epochs'
        print(f'{what}: {args.dataset}, {len(images)} images of {args.image_size} px, {per_epoch} steps of '
              f'{args.batch_size} per epoch, {device} ({args.precision}), {world} process(es), into {args.out_dir}; '
              f'a standardised with {"the statistics kept in ckpt.pt" if kept else "statistics of these images"}')

    t_start = time.time()
    for epoch in range(start, args.epochs):
        model.train()
        t0 = time.time()
        log = {'epoch': epoch + 1, **train_epoch(net, opt, batches, epoch, args, run)}
        # stop if the weights (the same in every process) are not finite: checked in all, so that all stop together
        if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
            stop(f'the weights are not finite after epoch {epoch + 1}', epoch, '--lr')
        if rank > 0:
            continue
        log['images_per_s'] = per_epoch * args.batch_size / (time.time() - t0)
        if monitor and args.eval_interval and ((epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs):
            log['knn_top1'] = knn_top1(*(data.encode(model.encoder, data.loader(ds, args.workers), run['norm'], device)
                                         for ds in monitor))
        eta = (time.time() - t_start) / (epoch + 1 - start) * (args.epochs - epoch - 1)
        print(f'epoch {epoch + 1}/{args.epochs}  L_inv {log["loss_inv"]:.4f}  L_eq {log["loss_eq"]:.4f}  '
              f'lr {log["lr"]:.4g}  {log["images_per_s"]:.0f} img/s  ETA {datetime.timedelta(seconds=round(eta))}'
              + (f'  1-NN {100 * log["knn_top1"]:.2f}%' if 'knn_top1' in log else ''))
        history.append(log)
        save_epoch(model, opt, history, args, run)


def prepare_out_dir(args, images):
    """Before the first step: --overwrite removes every file of the run it replaces (only now, so a run that cannot
    start loses nothing); views.png."""
    for f in run_files(args.out_dir) if args.overwrite else []:
        os.remove(os.path.join(args.out_dir, f))
        print(f'--overwrite: removed {os.path.join(args.out_dir, f)} of the run it replaces')
    data.show_views(images, os.path.join(args.out_dir, 'views.png'))


def save_epoch(model, opt, history, args, run):
    """ckpt.pt, then what derives from it: encoder.pt (and encoder-EPOCH.pt every --save-every epochs) in the
    authors' layout with the image size and normalisation to probe it with, and log.jsonl, a line per epoch."""
    epoch = history[-1]['epoch']
    save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': epoch, 'args': vars(args),
          'norm': run['norm'], 'stats': run['stats'], 'log': history}, os.path.join(args.out_dir, 'ckpt.pt'))
    encoder = {'backbone': model.encoder.state_dict(), 'image_size': args.image_size, 'norm': run['norm']}
    save(encoder, os.path.join(args.out_dir, 'encoder.pt'))
    if args.save_every and epoch % args.save_every == 0:  # as the authors' ckpt-{epoch}.pth
        save(encoder, os.path.join(args.out_dir, f'encoder-{epoch}.pt'))
    with open(os.path.join(args.out_dir, 'log.jsonl'), 'w') as f:
        f.writelines(json.dumps(e) + '\n' for e in history)


if __name__ == '__main__':
    main()
