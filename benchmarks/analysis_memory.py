"""Peak memory of eval_linear.py --analyze at two sizes of the test split, side by side in one run:
  trains a tiny STAR checkpoint (one epoch at 32 px) on an image folder, then analyses two image folders that
  differ only in the size of test/ (N and 4 N images; train/ the same). The analysis holds the features of a fixed
  sample of training images and one batch of test views, so the ratio of the two peaks should be about 1; a design
  holding every test view's features would grow with the split. Peaks are each process's maximum resident set
  (the analysing process, and its DataLoader workers, largest of them).
python benchmarks/analysis_memory.py [--test-images 400]"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from torchvision.transforms.v2 import functional as TF

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
PEAK = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('eval_linear.py', run_name='__main__'); "
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def write_folder(root, split, per_class, g, classes=4):
    for c in range(classes):
        os.makedirs(os.path.join(root, split, f'class{c}'), exist_ok=True)
        for i in range(per_class):
            img = (torch.rand(3, 40, 48, generator=g) * 60 + 40 * c).to(torch.uint8)
            TF.to_pil_image(img).save(os.path.join(root, split, f'class{c}', f'{i}.png'))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--test-images', type=int, default=400, help='N: the smaller test split; the larger is 4 N')
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        for name, n in [('small', args.test_images), ('large', 4 * args.test_images)]:
            write_folder(os.path.join(tmp, name), 'train', 100, torch.Generator().manual_seed(1))
            write_folder(os.path.join(tmp, name), 'test', n // 4, g)
        run = os.path.join(tmp, 'run')
        subprocess.run([sys.executable, 'train.py', '--dataset', 'folder', '--data-dir', os.path.join(tmp, 'small'),
                        '--out-dir', run, '--epochs', '1', '--batch-size', '32', '--experts', '4', '--image-size',
                        '32', '--eval-interval', '0'], cwd=HERE, check=True, capture_output=True)
        peaks = {}
        for name in ('small', 'large'):
            proc = subprocess.run([sys.executable, '-c', PEAK, 'eval_linear.py', '--ckpt', os.path.join(run, 'ckpt.pt'),
                                   '--dataset', 'shapes', '--data-dir', os.path.join(tmp, name), '--analyze',
                                   '--results', os.path.join(tmp, 'r.jsonl')], cwd=HERE, check=True,
                                  capture_output=True, text=True)
            main_kb, worker_kb = map(int, proc.stdout.split('peak')[-1].split())
            peaks[name] = main_kb / 1024
            n = args.test_images * (4 if name == 'large' else 1)
            print(f'{name}: {n} test images x 16 views, peak {main_kb / 1024:.0f} MB (largest worker '
                  f'{worker_kb / 1024:.0f} MB)')
        print(f'ratio of the peaks, large / small: {peaks["large"] / peaks["small"]:.2f} (the split is 4 times larger)')


if __name__ == '__main__':
    main()
