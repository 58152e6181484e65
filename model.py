"""Encoder, experts, soft task-aware routers, head variants, parameter projector psi and shift predictor phi."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

EMBED = 128  # the embedding size of every head


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


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's SyncBatchNorm for CPU processes (gloo), which torch's own refuses: batch moments summed over all
    processes with gradient, so BN sees the global batch. On GPUs train.py uses nn.SyncBatchNorm."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1] * dist.get_world_size()
        moments = AllReduce.apply(torch.stack([x.sum(dims), (x * x).sum(dims)])) / n
        mean, var = moments[0], moments[1] - moments[0] ** 2
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (x - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


def encoder(arch, bn=None):
    """torchvision ResNet with zero-initialised residual branches and fc = identity; returns (module, feature size d)."""
    net = getattr(torchvision.models, arch)(zero_init_residual=True, norm_layer=bn or nn.BatchNorm2d)
    d = net.fc.in_features
    net.fc = nn.Identity()
    return net, d


class Experts(nn.Module):
    """N experts Linear(d,d,no bias)-BN-ReLU-Linear(d,d,no bias)-BN-ReLU-Linear(d,out), run as one batched computation:
    weights stacked over experts, one einsum per layer, BatchNorm over N*d channels (so per expert and channel)."""

    def __init__(self, n, d, out=EMBED, hidden=None, bn=nn.BatchNorm1d):
        super().__init__()
        hidden = hidden or d
        self.n = n
        self.w1 = nn.Parameter(torch.empty(n, d, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, hidden))
        self.w3 = nn.Parameter(torch.empty(n, hidden, out))
        self.b3 = nn.Parameter(torch.empty(n, out))
        self.bn1, self.bn2 = bn(n * hidden), bn(n * hidden)
        for w, b in [(self.w1, None), (self.w2, None), (self.w3, self.b3)]:  # nn.Linear's default initialisation
            bound = w.shape[1] ** -0.5
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def forward(self, h):  # B x d -> B x N x out
        y = torch.einsum('bd,nde->bne', h, self.w1)
        y = self.bn1(y.flatten(1)).relu().view(y.shape)
        y = self.bn2(torch.einsum('bnd,nde->bne', y, self.w2).flatten(1)).relu().view(y.shape)
        return torch.einsum('bnd,nde->bne', y, self.w3) + self.b3


# Fixed mixing of the experts for the baselines: rows are (invariant, equivariant) weights over experts.
FIXED = {'shared': [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],  # STAR-SS: E_inv + E_sh, E_eq + E_sh
         'separate': [[1.0, 0.0], [0.0, 1.0]],  # EquiMod: two independent heads
         'simclr': [[1.0]]}  # one invariant head, no equivariant task


class Heads(nn.Module):
    """The experts and how each task mixes them: soft task-aware routers for `star`, fixed weights for the baselines."""

    def __init__(self, variant, d, n_experts=16, bn=nn.BatchNorm1d):
        super().__init__()
        self.variant = variant
        if variant == 'star':
            self.router_inv, self.router_eq = nn.Linear(d, n_experts), nn.Linear(d, n_experts)
        else:
            self.register_buffer('mix', torch.tensor(FIXED[variant]))
            n_experts = self.mix.shape[1]
        self.experts = Experts(n_experts, d, bn=bn)

    def routing(self, h):
        """Each task's weights over the experts (B x N each): softmax(R_inv(h)), softmax(R_eq(h)) for `star` (eq. routers)."""
        if self.variant == 'star':
            return [self.router_inv(h).softmax(1), self.router_eq(h).softmax(1)]
        return [m.expand(len(h), -1) for m in self.mix]

    def forward(self, h):
        """[z_inv, z_eq] (only z_inv for simclr) and their routing weights: z_task = sum_k w_task,k E_k(h) (eq. MMoE)."""
        weights, e = self.routing(h), self.experts(h)
        return [torch.einsum('bn,bnk->bk', w, e) for w in weights], weights


class STAR(nn.Module):
    """Encoder f, heads, and for the equivariant task psi: Linear(11, 128) and phi: MLP 256-512-512-128."""

    def __init__(self, arch='resnet18', heads='star', n_experts=16, equivariant=True, bn=None):
        """bn: the BatchNorm class of every layer (a synchronised one for multi-process runs); default: nn.BatchNorm*d."""
        super().__init__()
        self.encoder, d = encoder(arch, bn)
        bn = bn or nn.BatchNorm1d
        self.heads = Heads(heads if equivariant else 'simclr', d, n_experts, bn)
        self.equivariant = equivariant
        if equivariant:
            self.psi = nn.Linear(11, EMBED)
            self.phi = Experts(1, 2 * EMBED, EMBED, hidden=512, bn=bn)  # an expert-shaped MLP with 512 hidden units

    def predict(self, z0, a):
        """eq. shift predictor: z_hat = z0 + phi([z0; psi(a)])."""
        return z0 + self.phi(torch.cat([z0, self.psi(a)], 1))[:, 0]

    def forward(self, v1, v2, x0=None, a1=None, a2=None):
        """Embeddings of one step: three encoder calls (x0 only for the equivariant task), each its own BN batch."""
        (z1, w1), (z2, w2) = self.heads(self.encoder(v1)), self.heads(self.encoder(v2))
        out = {'z_inv': (z1[0], z2[0]), 'routing': [torch.cat(w) for w in zip(w1, w2)]}
        if self.equivariant:
            (_, z0), _ = self.heads(self.encoder(x0))
            out['z_eq'] = torch.cat([z1[1], z2[1]])
            out['z_hat'] = torch.cat([self.predict(z0, a1), self.predict(z0, a2)])
        return out
