"""The DataLoader workers' rate on ImageNet-sized files, and the workers a GPU needs:
  generates JPEG files of 500 x 375 (ImageNet's typical size; a few of other sizes), then times, in one process
  with one thread as a DataLoader worker runs, the training items of the pipeline: decode the file, make x0
  (resize and centre crop), draw two RandomResizedCrop boxes on the image's own size and resize each to 224 px.
  Target: at least 300 source images per second per worker. A ResNet-50 STAR step at 224 px on one H100 in bf16
  consumes roughly 900 source images per second (three encoder passes each), whence the workers per GPU printed.
python benchmarks/loader.py [--images 200] [--repeats 3] [--image-size 224]"""
import argparse
import math
import os
import sys
import tempfile
import time

import torch
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import data  # noqa: E402

GPU_IMAGES_PER_S = 900  # source images a ResNet-50 STAR step consumes on one H100 in bf16 (estimate)


def write_jpegs(folder, n, g):
    """n photo-like JPEG files (smooth noise, quality 90), most 500 x 375, some 375 x 500 and 500 x 333."""
    for i in range(n):
        h, w = [(375, 500), (500, 375), (333, 500)][i % 5 // 3 + (i % 7 == 0)]
        x = TF.gaussian_blur((torch.rand(3, h // 4, w // 4, generator=g) * 255).to(torch.uint8), 3)
        TF.to_pil_image(TF.resize(x, [h, w], antialias=True)).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=200)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--image-size', type=int, default=224)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, args.images, torch.Generator().manual_seed(0))
        paths = data.list_images(folder)
        ds = data.Images(paths, torch.zeros(len(paths)), args.image_size)
        rates = []
        for r in range(args.repeats + 1):  # the first pass warms the page cache and is not counted
            t = time.perf_counter()
            for i in range(len(ds)):
                ds[(i, r * len(ds) + i)]
            rates.append(len(ds) / (time.perf_counter() - t))
    rate = sorted(rates[1:])[len(rates[1:]) // 2]
    print(f'{len(paths)} JPEG files of about 500 x 375, {args.image_size} px crops, one thread, median of '
          f'{args.repeats}: {rate:.0f} source images/s per worker (target >= 300)')
    print(f'a GPU consuming {GPU_IMAGES_PER_S} source images/s needs {math.ceil(GPU_IMAGES_PER_S / rate)} workers '
          f'(--workers) at this rate')


if __name__ == '__main__':
    main()
