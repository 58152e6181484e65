"""Speed figures of the training step, printed side by side from one run on this machine:
  (a) STAR step time / SimCLR step time, same batch and encoder, beside its floor: the ratio of the two steps'
      multiply-adds (forward and backward), counted by torch.utils.flop_counter.FlopCounterMode
  (b) the share of a STAR step spent on the device making the two views from the crops the DataLoader workers
      bring (flip, colour, grayscale, blur; target <= 3% on the CPU), and the workers' rate of training items
      (x0 and two crops with their parameters, from images in memory) per worker; a per-image torchvision PIL
      pipeline making the whole views is printed beside it, for information
  (c) the heads' (experts, routers, psi, phi, losses) share of a STAR step (target <= 5% at 96 px)
python benchmarks/bench.py [--batch-size 64] [--device cpu] [--repeats 3]"""
import argparse
import os
import sys
import time

import torch
import torchvision.transforms as T
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import data  # noqa: E402
import train  # noqa: E402
from losses import nt_xent  # noqa: E402
from model import STAR  # noqa: E402


def timed(fn, device, repeats):
    """Median seconds of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def flops(fn):
    """Multiply-adds (as FLOPs) of one call of fn, forward and backward."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_batch(ds, b):
    """b training items of ds, as one DataLoader worker makes them."""
    return torch.utils.data.default_collate([ds[(i, i)] for i in range(b)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--image-size', type=int, default=96)
    p.add_argument('--experts', type=int, default=16)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    device, b, s = torch.device(args.device), args.batch_size, args.image_size
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8)
    ds, stats = data.Images(images, torch.zeros(b), s), data.param_stats(torch.tensor([[s, s]]))
    batch, order = training_batch(ds, b), train.step_orders(argparse.Namespace(seed=0), 0, 0)
    run = {'norm': data.STL10_NORM, 'stats': stats, 'device': device}
    flags = argparse.Namespace(tau=0.2, precision='fp32')

    def step_fn(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            l_inv, l_eq, _ = train.objective(model, batch, order, run, flags)
            opt.zero_grad()
            (l_inv + l_eq).backward()
            opt.step()
        return step

    torch.manual_seed(0)
    star = STAR('resnet18', 'star', args.experts).to(device)
    simclr = STAR('resnet18', 'simclr').to(device)
    if device.type == 'cuda':
        star, simclr = star.to(memory_format=torch.channels_last), simclr.to(memory_format=torch.channels_last)
    t_star, t_simclr = timed(step_fn(star), device, args.repeats), timed(step_fn(simclr), device, args.repeats)
    floor = flops(step_fn(star)) / flops(step_fn(simclr))

    # the heads alone: the same work on fixed encoder features of the three inputs
    h = [torch.randn(b, 512, device=device) for _ in range(3)]
    a = [torch.randn(b, 11, device=device) for _ in range(2)]

    def heads_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
            e1, e2, e0 = (star.heads(x) for x in h)
            z_hat = torch.cat([star.shift(e0['z_eq'], a[0]), star.shift(e0['z_eq'], a[1])])
        (nt_xent(e1['z_inv'], e2['z_inv']) + nt_xent(torch.cat([e1['z_eq'], e2['z_eq']]), z_hat)).backward()
    t_heads = timed(heads_step, device, args.repeats)

    pil = T.Compose([T.RandomResizedCrop(s, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                     T.RandomApply([T.GaussianBlur(int(0.1 * s) // 2 * 2 + 1, (0.1, 2.0))], p=0.5),
                     T.ToTensor(), T.Normalize(*data.STL10_NORM)])
    pil_images = [T.functional.to_pil_image(x) for x in images]
    t_pil = timed(lambda: [torch.stack([pil(x) for x in pil_images]) for _ in range(2)], device, args.repeats)
    t_batched = timed(lambda: data.make_views(*(t.to(device) for t in batch), order, data.STL10_NORM, stats), device,
                      args.repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    t_items = timed(lambda: training_batch(ds, b), device, args.repeats)
    torch.set_num_threads(threads)

    print(f'device {device}, batch {b}, {s} px, ResNet-18, {args.experts} experts, median of {args.repeats}')
    print(f'(a) step time  STAR {t_star:.3f} s  SimCLR {t_simclr:.3f} s  ratio {t_star / t_simclr:.2f}  '
          f'floor {floor:.2f} (multiply-adds)  {100 * (t_star / t_simclr / floor - 1):+.0f}% over the floor')
    print(f'(b) two views  {t_batched:.3f} s of a {t_star:.3f} s STAR step  share {100 * t_batched / t_star:.1f}%  '
          f'(target <= 3%)  [workers: {b / t_items:.0f} items/s each; per-image PIL views {2 * b / t_pil:.0f} img/s]')
    print(f'(c) heads      {t_heads:.3f} s of a {t_star:.3f} s STAR step  share {100 * t_heads / t_star:.1f}%  '
          f'(target <= 5%)')


if __name__ == '__main__':
    main()
