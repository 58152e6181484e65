"""The method's modules: encoder f, experts E_k, soft task-aware routers, head variants, psi and phi; reading the
checkpoints that hold them and restoring an encoder from any layout read."""
import pathlib
import pickle

import torch
import torch.nn as nn
import torchvision

from data import FIELDS, PRETRAIN, fail

EMBED = 128  # the embedding size of every head
RUN_KEYS = {'model', 'optimizer', 'epoch', 'args', 'log'}  # what every ckpt.pt holds (train.save_epoch)


def encoder(arch, bn=None):
    """torchvision ResNet, fc = identity, initialised as the authors' code does: zero_init_residual, then every
    convolution reset to PyTorch's default. Returns (module, feature size d)."""
    net = getattr(torchvision.models, arch)(zero_init_residual=True, norm_layer=bn or nn.BatchNorm2d)
    d = net.fc.in_features
    net.fc = nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return net, d


class Experts(nn.Module):
    """N experts Linear(d,d,no bias)-BN-ReLU-Linear(d,d,no bias)-BN-ReLU-Linear(d,out) as one batched computation:
    weights stacked over experts, one einsum per layer, BatchNorm over N*d channels (per expert)."""

    def __init__(self, n, d, out=EMBED, hidden=None, bn=nn.BatchNorm1d):
        super().__init__()
        h = hidden or d  # the hidden width
        self.w1, self.w2, self.w3 = (nn.Parameter(torch.empty(n, *shape)) for shape in [(d, h), (h, h), (h, out)])
        self.b3 = nn.Parameter(torch.empty(n, out))
        self.bn1, self.bn2 = bn(n * h), bn(n * h)
        for w, fan_in in [(self.w1, d), (self.w2, h), (self.w3, h), (self.b3, h)]:
            nn.init.uniform_(w, -fan_in ** -0.5, fan_in ** -0.5)  # as every nn.Linear: uniform +-1/sqrt(fan_in)

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
    """The experts and how each task mixes them: soft task-aware routers for `star`, fixed weights otherwise."""

    def __init__(self, variant, d, n_experts=16, bn=nn.BatchNorm1d):
        super().__init__()
        self.routed = variant == 'star'  # soft task-aware routers; fixed mixing weights for the baselines
        if self.routed:
            self.router_inv, self.router_eq = nn.Linear(d, n_experts), nn.Linear(d, n_experts)
        else:
            self.register_buffer('mix', torch.tensor(FIXED[variant]))
            n_experts = self.mix.shape[1]
        self.experts = Experts(n_experts, d, bn=bn)

    def routing(self, h):
        """Routing weights s over the experts (B x N each): s_inv = softmax(R_inv(h)), s_eq = softmax(R_eq(h))."""
        if self.routed:
            return [self.router_inv(h).softmax(1), self.router_eq(h).softmax(1)]
        return [m.expand(len(h), -1) for m in self.mix]

    def forward(self, h):
        """z_inv, z_eq (only z_inv for simclr) and the routing weights s: z_task = sum_k s_task,k E_k(h) (MMoE)."""
        e, out = self.experts(h), {}
        for task, s in zip(['inv', 'eq'], self.routing(h)):
            out[f'z_{task}'], out[f's_{task}'] = torch.einsum('bn,bnk->bk', s, e), s
        return out


class Shift(nn.Module):
    """Shift predictor of width d: z_hat = z0 + phi([z0; psi(a)]), psi: Linear(11, d), phi: MLP 2d-512-512-d."""

    def __init__(self, d=EMBED, bn=nn.BatchNorm1d):
        super().__init__()
        self.psi = nn.Linear(len(FIELDS), d)  # a: the 11 fields of data.FIELDS
        self.phi = Experts(1, 2 * d, d, hidden=512, bn=bn)  # an expert-shaped MLP with 512 hidden units

    def forward(self, z0, a):
        return z0 + self.phi(torch.cat([z0, self.psi(a)], 1))[:, 0]


class STAR(nn.Module):
    """Encoder f, heads (star, shared, separate, or simclr: no equivariant task) and the shift predictor; bn: the
    BatchNorm class of every layer (synchronised in multi-process runs)."""

    def __init__(self, arch='resnet18', heads='star', n_experts=16, bn=None):
        super().__init__()
        self.encoder, d = encoder(arch, bn)
        self.heads = Heads(heads, d, n_experts, bn or nn.BatchNorm1d)
        self.equivariant = heads != 'simclr'
        if self.equivariant:
            self.shift = Shift(EMBED, bn or nn.BatchNorm1d)

    def embed(self, x):
        return self.heads(self.encoder(x))

    def forward(self, x0, v1, v2, a1, a2):
        """One step's named parts, pairs being (view 1, view 2): z_inv of the views; z0 = z_eq(x0), z_eq of the views
        and z_hat = shift(z0, a_i); routing weights s_inv, s_eq of the views (2B x N). Encoder calls x0, v1, v2."""
        z0 = self.embed(x0)['z_eq'] if self.equivariant else None  # no x0 pass without the equivariant task
        e1, e2 = self.embed(v1), self.embed(v2)
        out = {'z_inv': (e1['z_inv'], e2['z_inv'])}
        out |= {s: torch.cat([e1[s], e2[s]]) for s in ('s_inv', 's_eq') if s in e1}
        if self.equivariant:
            out |= {'z0': z0, 'z_eq': (e1['z_eq'], e2['z_eq']), 'z_hat': (self.shift(z0, a1), self.shift(z0, a2))}
        return out


# ---- checkpoints

def save(obj, path):
    """Write atomically: a temporary file, then a rename, so a crash or a full disk never leaves a half-written file."""
    try:
        torch.save(obj, path + '.tmp')
        pathlib.Path(path + '.tmp').replace(path)
    except (OSError, RuntimeError) as e:  # torch raises RuntimeError('... file write failed') where the disk is full
        pathlib.Path(path + '.tmp').unlink(missing_ok=True)
        fail(f'cannot write {path}: the disk is full or failing ({type(e).__name__}); what was there before is kept')


def load_checkpoint(path):
    """torch.load of weights only. A file it cannot unpickle as weights (a whole pickled model, or not a torch file)
    ends in one line: torch's own error advises weights_only=False, which would run what the file holds."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        fail(f'{path} holds no weights torch reads safely (a whole pickled model? no torch file?): save a state_dict')


def restore(path):
    """(encoder, image size, normalisation, model, checkpoint) of any layout read; model: the whole STAR of a train.py
    ckpt.pt, else None. An encoder that records no normalisation takes the image size and normalisation of the paper's
    pretraining of its data set, or of its architecture: STL-10 for a ResNet-18, ImageNet-100 for a ResNet-50."""
    ckpt = load_checkpoint(path)
    size, norm, model, run = ckpt.get('image_size'), ckpt.get('norm'), None, ckpt.get('args')
    if RUN_KEYS <= ckpt.keys():  # train.py's ckpt.pt
        model = STAR(run['arch'], run['heads'], run['experts'])
        model.load_state_dict(ckpt['model'])
        net, size, pretrained = model.encoder, run['image_size'], run['dataset']
    else:  # encoder.pt, an official {'backbone': ...} or a bare ResNet state dict
        state = {k.removeprefix('module.'): v for k, v in ckpt.get('backbone', ckpt).items() if not k.startswith('fc.')}
        arch = 'resnet50' if 'layer1.0.conv3.weight' in state else 'resnet18'
        net, _ = encoder(arch)
        net.load_state_dict(state)
        pretrained = 'imagenet100' if arch == 'resnet50' else 'stl10'
    if not norm:
        size, norm = size or PRETRAIN[pretrained][0], PRETRAIN[pretrained][1]
        print(f'{path} records no normalisation: probed as pretrained on {pretrained} ({size} px, mean, std {norm})')
    return net, size, norm, model, ckpt
