"""STAR pretraining. The paper's STL-10 recipe is the default: python train.py --dataset stl10
On G devices (DDP, SyncBatchNorm, negatives from all processes): torchrun --nproc_per_node=G train.py ..."""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from data import fail
from losses import nt_xent
from model import STAR, CPUSyncBatchNorm

# Flags that fix the model: a checkpoint resumes only under the same values.
MODEL_FLAGS = ('dataset', 'arch', 'heads', 'experts', 'image_size')


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--dataset', choices=['stl10', 'folder'], default='stl10',
                   help='stl10: STL-10 train+unlabeled (105k images, downloaded into --data-dir when online); '
                        'folder: every image below --data-dir')
    p.add_argument('--data-dir', default='data', help='holds stl10_binary/ for stl10; the image folder for folder')
    p.add_argument('--out-dir', default='out', help='ckpt.pt (resumable), encoder.pt (torchvision ResNet weights), log.jsonl')
    p.add_argument('--arch', choices=['resnet18', 'resnet50'], default='resnet18', help='torchvision encoder')
    p.add_argument('--heads', choices=['star', 'shared', 'separate'], default='star',
                   help='star: N soft-routed experts; shared: STAR-SS (E_inv+E_sh, E_eq+E_sh); separate: EquiMod-style')
    p.add_argument('--experts', type=int, default=16, help='number of experts N for --heads star')
    p.add_argument('--eq-weight', type=float, default=1.0,
                   help='lambda in L = L_inv + lambda L_eq; 0 is the SimCLR baseline: one head, no x0 pass, no psi/phi')
    p.add_argument('--tau', type=float, default=0.2, help='NT-Xent temperature of both losses')
    p.add_argument('--epochs', type=int, default=200, help='epochs; the cosine schedule spans all of them')
    p.add_argument('--batch-size', type=int, default=256, help='global batch, split over the processes')
    p.add_argument('--lr', type=float, default=0.03, help='SGD learning rate per 256 images (lr * batch / 256 is used)')
    p.add_argument('--wd', type=float, default=5e-4, help='weight decay on all parameters')
    p.add_argument('--image-size', type=int, default=96, help='images are resized once at load to this size')
    p.add_argument('--seed', type=int, default=0, help='initialisation, sample order and every augmentation derive from it')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--eval-interval', type=int, default=10, help='epochs between 1-NN monitor runs (stl10); 0: never')
    p.add_argument('--resume', action='store_true', help='continue the run in --out-dir from its ckpt.pt')
    args = p.parse_args(argv)
    if args.batch_size < 2:
        fail('--batch-size must be at least 2: NT-Xent needs negatives')
    if args.experts < (2 if args.heads == 'star' else 1):
        fail('--experts must be at least 2 for --heads star (a router over one expert is no routing)')
    if args.image_size < 32:
        fail('--image-size must be at least 32: the ResNet encoder downsamples by 32')
    if args.eq_weight < 0 or args.epochs < 1:
        fail('--eq-weight must be >= 0 and --epochs >= 1')
    check_device(args.device)
    return args


def check_device(name):
    if name.startswith('cuda') and not torch.cuda.is_available():
        fail(f'--device {name}: CUDA is not available here; use --device cpu')


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')


@torch.no_grad()
def encode(encoder, images, norm, device, batch=256):
    """Pooled encoder features (eval mode, no augmentation) of uint8 images, on the CPU."""
    encoder.eval()
    feats = []
    for i in tqdm(range(0, len(images), batch), desc='encoding', leave=False):
        with autocast(device):
            feats.append(encoder(data.normalize(images[i:i + batch].to(device).float().div(255), norm)).float().cpu())
    return torch.cat(feats)


def knn_top1(train, train_y, test, test_y):
    """1-nearest-neighbour accuracy with cosine similarity."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    nearest = torch.cat([(t @ train.T).argmax(1) for t in test.split(1024)])
    return (train_y[nearest] == test_y).float().mean().item()


def objective(net, images, p, order, norm, stats, tau, equivariant):
    """L_inv and L_eq of one batch, and the routing weights of the views."""
    x0, v1, v2, a1, a2 = data.make_views(images, p, order, norm, stats)
    if images.is_cuda:
        x0, v1, v2 = (x.contiguous(memory_format=torch.channels_last) for x in (x0, v1, v2))
    with autocast(images.device):
        out = net(v1, v2, x0, a1, a2) if equivariant else net(v1, v2)
    l_inv = nt_xent(*out['z_inv'], tau)
    l_eq = nt_xent(out['z_eq'], out['z_hat'], tau) if equivariant else torch.zeros((), device=images.device)
    return l_inv, l_eq, out['routing']


def save(obj, path):
    """Write atomically: a temporary file, then a rename, so a crash never leaves a half-written file."""
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f'no checkpoint at {path}; check the path (train.py writes OUT_DIR/ckpt.pt)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        fail(f'{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or not a torch file')


def main(argv=None):
    args = get_args(argv)
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    device = torch.device(args.device)
    if world > 1:
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        if args.batch_size % world:
            fail(f'--batch-size {args.batch_size} must be divisible by the {world} processes')
    torch.backends.cudnn.benchmark = True
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        writable = os.access(args.out_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        fail(f'cannot write to --out-dir {args.out_dir}; choose a writable folder')
    ckpt_path, log_path = os.path.join(args.out_dir, 'ckpt.pt'), os.path.join(args.out_dir, 'log.jsonl')
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    if ckpt:
        old = {k: ckpt['args'][k] for k in MODEL_FLAGS} | {'equivariant': ckpt['args']['eq_weight'] > 0}
        new = {k: vars(args)[k] for k in MODEL_FLAGS} | {'equivariant': args.eq_weight > 0}
        if old != new:
            diff = ', '.join(f'{k}: {old[k]} there, {new[k]} here' for k in old if old[k] != new[k])
            fail(f'--resume: {ckpt_path} belongs to another model ({diff}); pass its flags or use a new --out-dir')

    if args.dataset == 'stl10':
        images, labels = data.stl10(args.data_dir, 'train+unlabeled', args.image_size)
        test_images, test_labels = data.stl10(args.data_dir, 'test', args.image_size)
        norm = data.STL10_NORM
    else:
        images, _, _ = data.image_folder(args.data_dir, args.image_size)
        norm = data.channel_stats(images)
    steps, b = len(images) // args.batch_size, args.batch_size // world
    if steps == 0:
        fail(f'--batch-size {args.batch_size} is larger than the data set ({len(images)} images)')
    stats = data.param_stats(args.image_size)

    torch.manual_seed(args.seed)
    equivariant = args.eq_weight > 0
    bn = (torch.nn.SyncBatchNorm if device.type == 'cuda' else CPUSyncBatchNorm) if world > 1 else None
    model = STAR(args.arch, args.heads, args.experts, equivariant, bn).to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    start = 0
    if ckpt:
        model.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optimizer'])
        start = ckpt['epoch']
        if rank == 0 and os.path.exists(log_path):  # drop lines of epochs the checkpoint does not hold
            with open(log_path) as f:
                lines = [line for line in f if json.loads(line)['epoch'] <= start]
            with open(log_path, 'w') as f:
                f.writelines(lines)
    net = DistributedDataParallel(model) if world > 1 else model

    for epoch in range(start, args.epochs):
        model.train()
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(hash((args.seed, epoch))))
        sums, routing, t0 = torch.zeros(2), 0, time.time()
        bar = tqdm(range(steps), desc=f'epoch {epoch + 1}/{args.epochs}', disable=rank > 0)
        for step in bar:
            t = (epoch * steps + step) / (args.epochs * steps)  # cosine schedule over steps, no warm-up
            lr = args.lr * args.batch_size / 256 * 0.5 * (1 + math.cos(math.pi * t))
            for group in opt.param_groups:
                group['lr'] = lr
            g = torch.Generator().manual_seed(hash((args.seed, epoch, step)))  # this step's augmentations, for the global batch
            p, order = (x.view(2, args.batch_size, -1)[:, rank * b:(rank + 1) * b] for x in data.sample(2 * args.batch_size, args.image_size, g))
            idx = perm[step * args.batch_size:][rank * b:(rank + 1) * b]
            l_inv, l_eq, weights = objective(net, images[idx].to(device), p, order, norm, stats, args.tau, equivariant)
            terms = torch.stack([l_inv, l_eq]).detach()
            if world > 1:
                dist.all_reduce(terms)
                terms /= world
            terms = terms.cpu()
            if not terms.isfinite().all():
                fail(f'non-finite loss at epoch {epoch + 1} step {step + 1}: L_inv {terms[0]:.4g}, L_eq {terms[1]:.4g}; '
                     f'nothing was saved for this epoch; lower --lr or check the data')
            opt.zero_grad(set_to_none=True)
            (l_inv + args.eq_weight * l_eq).backward()
            opt.step()
            sums += terms
            routing = routing + torch.stack([w.detach().float().mean(0) for w in weights]).cpu()
            bar.set_postfix(L_inv=f'{terms[0]:.3f}', L_eq=f'{terms[1]:.3f}', lr=f'{lr:.4f}')
        if rank > 0:
            continue
        log = {'epoch': epoch + 1, 'loss_inv': sums[0].item() / steps, 'loss_eq': sums[1].item() / steps, 'lr': lr,
               'images_per_s': steps * args.batch_size / (time.time() - t0),
               'routing': dict(zip(['inv', 'eq'], (routing / steps).tolist()))}
        if args.dataset == 'stl10' and args.eval_interval and ((epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs):
            train = labels >= 0
            log['knn_top1'] = knn_top1(encode(model.encoder, images[train], norm, device), labels[train],
                                       encode(model.encoder, test_images, norm, device), test_labels)
            print(f'epoch {epoch + 1}: 1-NN accuracy {100 * log["knn_top1"]:.2f}%')
        with open(log_path, 'a') as f:
            f.write(json.dumps(log) + '\n')
        save(model.encoder.state_dict(), os.path.join(args.out_dir, 'encoder.pt'))
        save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': epoch + 1, 'args': vars(args),
              'norm': norm}, ckpt_path)
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
