"""NT-Xent (InfoNCE with cosine similarity) for the invariant and the equivariant objectives, with the negatives of
every process in multi-process runs."""
import torch
import torch.distributed as dist
import torch.nn.functional as F


class AllReduce(torch.autograd.Function):
    """Sum over processes, with gradient: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return AllReduce.forward(ctx, grad)


def gather(x):
    """Rows of every process, in rank order, with gradient (a plain all_gather has no backward)."""
    if not dist.is_initialized():
        return x
    rows = torch.zeros(dist.get_world_size(), *x.shape, dtype=x.dtype, device=x.device)
    rows[dist.get_rank()] = x
    return AllReduce.apply(rows).flatten(0, 1)


def nt_xent(a, b, tau=0.2):
    """Row m of `a` and row m of `b` are positives; every other row of a and b (from all processes) is a negative.
    Mean over this process's 2M anchors; averaged over processes it is the loss of the global batch.
      L_inv = nt_xent(z_inv(v1), z_inv(v2))                     the SimCLR loss
      L_eq  = nt_xent([z_eq(v1); z_eq(v2)], [z_hat1; z_hat2])   the other view of an image is a negative too"""
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    m, rank = len(a), dist.get_rank() if dist.is_initialized() else 0
    keys = torch.cat([gather(a), gather(b)])  # 2GM rows: all a's, then all b's
    i = torch.arange(m, device=a.device) + rank * m
    own = torch.cat([i, i + len(keys) // 2])  # where each anchor sits among the keys
    positive = torch.cat([i + len(keys) // 2, i])
    logits = torch.cat([a, b]) @ keys.T / tau
    logits = logits.masked_fill(F.one_hot(own, len(keys)).bool(), float('-inf'))
    return F.cross_entropy(logits, positive)
