"""common.py against independent references: losses, aggregation, kNN, partitions, augmentation, data."""
import copy
import gzip
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# --- losses ----------------------------------------------------------------------------------

def nt_xent_loop(z1, z2, tau):
    """SimCLR Eq. 1 written out: for each of the 2B views, -log(exp(s_pos) / sum_{k != i} exp(s_ik))."""
    z = torch.cat([z1, z2])
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        cos = lambda a, c: (z[a] @ z[c]) / (z[a].norm() * z[c].norm())
        denom = sum(math.exp(cos(i, k).item() / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(cos(i, j).item() / tau) / denom)
    return total / n


def info_nce_loop(q, k, queue, tau):
    total = 0.0
    for i in range(len(q)):
        qi, ki = q[i] / q[i].norm(), k[i] / k[i].norm()
        pos = math.exp((qi @ ki).item() / tau)
        neg = sum(math.exp((qi @ n).item() / tau) for n in queue)
        total += -math.log(pos / (pos + neg))
    return total / len(q)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(tau):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert common.nt_xent(z1, z2, tau).item() == pytest.approx(nt_xent_loop(z1, z2, tau), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_symmetric():
    torch.manual_seed(1)
    z = torch.randn(8, 16)
    assert common.nt_xent(z, z, 0.1) < common.nt_xent(z, torch.randn(8, 16), 0.1)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    assert common.nt_xent(z1, z2, 0.5).item() == pytest.approx(common.nt_xent(z2, z1, 0.5).item(), rel=1e-6)


def test_info_nce_matches_loop_reference_with_and_without_queue():
    torch.manual_seed(2)
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    queue = F.normalize(torch.randn(7, 8), dim=1)
    assert common.info_nce(q, k, queue, 0.2).item() == pytest.approx(info_nce_loop(q, k, queue, 0.2), rel=1e-5)
    assert common.info_nce(q, k, queue[:0], 0.2).item() == pytest.approx(0.0, abs=1e-7)   # only the positive


def test_info_nce_sends_no_gradient_into_the_queue():
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    queue = torch.randn(6, 8, requires_grad=True)
    common.info_nce(q, k, queue.detach(), 0.2).backward()
    assert q.grad is not None and queue.grad is None


def test_ema_update_moves_parameters_and_copies_buffers():
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.fill_(1.0), target.weight.fill_(0.0)
        online.running_mean.fill_(5.0)
    common.ema_update(target, online, m=0.9)
    assert torch.allclose(target.weight, torch.full((3,), 0.1))
    assert torch.equal(target.running_mean, online.running_mean)


# --- aggregation -----------------------------------------------------------------------------

def test_fedavg_weighted_by_hand_including_batchnorm_buffers():
    nets = [nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)) for _ in range(3)]
    for i, net in enumerate(nets):
        for p in net.parameters():
            nn.init.constant_(p, float(i + 1))            # client i: every weight = i + 1
        net[1].running_mean.fill_(10.0 * (i + 1))
        net[1].running_var.fill_(float(i + 1) ** 2)
        net[1].num_batches_tracked.fill_([3, 4, 10][i])
    sizes = [100, 300, 600]
    avg = common.fedavg([n.state_dict() for n in nets], weights=sizes)
    # hand computation: weights 0.1, 0.3, 0.6
    assert torch.allclose(avg["0.weight"], torch.full((2, 2), 0.1 * 1 + 0.3 * 2 + 0.6 * 3))
    assert torch.allclose(avg["1.running_mean"], torch.full((2,), 0.1 * 10 + 0.3 * 20 + 0.6 * 30))
    assert torch.allclose(avg["1.running_var"], torch.full((2,), 0.1 * 1 + 0.3 * 4 + 0.6 * 9))
    nbt = avg["1.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.item() == round(0.1 * 3 + 0.3 * 4 + 0.6 * 10)   # 7.5 -> 8
    nets[0].load_state_dict(avg)                          # loadable as a state dict


def test_fedavg_unweighted_is_plain_mean():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    assert torch.equal(common.fedavg(states)["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(common.fedavg(states, weights=[1, 3])["w"], torch.tensor([2.5, 5.0]))


# --- evaluation ------------------------------------------------------------------------------

def knn_brute_force(bank, bank_y, query, num_classes, k, t):
    preds = []
    for q in query:
        sims = [(F.cosine_similarity(q, b, dim=0).item(), int(y)) for b, y in zip(bank, bank_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_matches_brute_force(k):
    torch.manual_seed(3)
    bank, bank_y, query = torch.randn(60, 6), torch.randint(0, 4, (60,)), torch.randn(25, 6)
    fast = common.knn_predict(bank, bank_y, query, 4, k=k, t=0.1, chunk=7).tolist()
    assert fast == knn_brute_force(bank, bank_y, query, 4, k, 0.1)


def test_linear_probe_separable_features_and_seeded():
    torch.manual_seed(4)
    y = torch.randint(0, 3, (300,))
    f = F.one_hot(y, 3).float() * 3 + 0.1 * torch.randn(300, 3)
    acc = common.linear_probe(f[:200], y[:200], f[200:], y[200:], 3, epochs=20, seed=0, batch=32)
    assert acc > 0.95
    assert acc == common.linear_probe(f[:200], y[:200], f[200:], y[200:], 3, epochs=20, seed=0, batch=32)


def linear_probe_loop(train_f, train_y, test_f, test_y, num_classes, epochs, seed, batch, lr):
    """The probe's recipe written out, with the test accuracy after EVERY epoch."""
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_f.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.reset_parameters()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(train_f) / batch))
    accs = []
    for _ in range(epochs):
        order = torch.randperm(len(train_f), generator=gen)
        for i in range(0, len(order), batch):
            b = order[i:i + batch]
            loss = F.cross_entropy(head(train_f[b]), train_y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            accs.append((head(test_f).argmax(1) == test_y).float().mean().item())
    return accs


def test_linear_probe_reports_the_last_epoch_not_the_best():
    """Noisy features: the test accuracy peaks at epoch 4 and ends lower; the probe reports the end."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (160,), generator=g)
    f = F.one_hot(y, 3).float() + 1.5 * torch.randn(160, 3, generator=g)
    accs = linear_probe_loop(f[:60], y[:60], f[60:], y[60:], 3, epochs=8, seed=0, batch=16, lr=0.1)
    got = common.linear_probe(f[:60], y[:60], f[60:], y[60:], 3, epochs=8, seed=0, batch=16, lr=0.1)
    assert got == accs[-1] < max(accs)


def test_few_label_subset_is_class_balanced_seeded_and_takes_all_of_a_small_class():
    labels = np.repeat(np.arange(10), [173] * 9 + [13])         # 1570 images; class 9 holds only 13
    for fraction, per_class in ((0.01, 2), (0.10, 16)):         # round(1.57) = 2, round(15.7) = 16 per class
        ids = common.few_label_subset(labels, fraction, 10, seed=7)
        assert len(np.unique(ids)) == len(ids) and ids.max() < len(labels)
        assert np.bincount(labels[ids], minlength=10).tolist() == [per_class] * 9 + [min(per_class, 13)]
        assert np.array_equal(ids, common.few_label_subset(labels, fraction, 10, seed=7))     # seeded
        assert not np.array_equal(ids, common.few_label_subset(labels, fraction, 10, seed=8))


def test_evaluate_matches_brute_force_knn_on_the_few_label_subsets(tmp_path):
    """Run.evaluate's 1 % / 10 % numbers = a loop-based kNN (k capped at the bank size) and the probe on that
    subset of the run's own training images; the trained keys, the monitor and the summary agree."""
    args = common.RunArgs(train_size=300, test_size=40, clients=2, partition="iid", probe_epochs=3, seed=5,
                          device="cpu", out=str(tmp_path))
    run = common.Run(args, "test")
    enc = common.make_encoder(args, run.data.channels)
    got = run.evaluate(enc)
    assert tuple(got) == common.EVAL_KEYS
    tr, te = (common.features(enc, x, run.augment) for x in (run.data.train_x, run.data.test_x))
    y, ty = run.data.train_y, run.data.test_y
    banks = {"": torch.arange(len(y)), **{f"_{n}": run.few_label_ids[n] for n in common.FEW_LABELS}}
    assert [len(b) for b in banks.values()] == [300, 10, 30]      # 1 and 3 images of each of the 10 classes
    for suffix, ids in banks.items():
        assert np.bincount(y[ids].numpy(), minlength=10).tolist() == [len(ids) // 10] * 10
        ref = knn_brute_force(tr[ids], y[ids], te, 10, k=200, t=0.1)
        assert got["knn_acc" + suffix] == pytest.approx(np.mean(np.array(ref) == ty.numpy())), suffix
        assert got["linear_acc" + suffix] == common.linear_probe(tr[ids], y[ids], te, ty, 10, 3, seed=5), suffix
    assert run.monitor(enc) == {"knn_acc": got["knn_acc"], "knn_acc_1pct": got["knn_acc_1pct"]}


def test_client_sampling_is_drawn_per_round_and_reproducible(tmp_path):
    """participation 0.3 of 10 clients: 3 distinct clients sorted by id, another draw in every round (over 8
    rounds not all the same), the same draw again for the same round (resume, every torchrun process)."""
    args = common.RunArgs(train_size=100, test_size=20, clients=10, partition="iid", participation=0.3, seed=3,
                          device="cpu", out=str(tmp_path))
    run = common.Run(args, "test")
    picks = {}
    for rnd in range(1, 9):
        run.round = rnd
        picks[rnd] = run.sample_clients()
        assert len(picks[rnd]) == 3 and picks[rnd] == sorted(set(picks[rnd])) and max(picks[rnd]) < 10
    assert len({tuple(p) for p in picks.values()}) > 4                  # C(10, 3) = 120 possible draws
    run.round = 5
    assert run.sample_clients() == picks[5]
    run.args.seed, other = 4, []
    for rnd in range(1, 9):
        run.round = rnd
        other.append(run.sample_clients())
    assert other != list(picks.values())                                # another seed, other draws


# --- partitions ------------------------------------------------------------------------------

def args_for(**kw):
    base = dict(clients=10, partition="iid", alpha=0.5, classes_per_client=2, skew_ratio=0.0,
                min_client_size=10, seed=0)
    return SimpleNamespace(**{**base, **kw})


LABELS = np.repeat(np.arange(10), 100)            # 1000 images, 100 per class


def check_disjoint_covering(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == n and len(np.unique(flat)) == n


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "classes", "skew"])
def test_partitions_disjoint_covering_seeded(kind):
    parts = common.partition(LABELS, args_for(partition=kind, skew_ratio=0.5))
    check_disjoint_covering(parts, len(LABELS))
    again = common.partition(LABELS, args_for(partition=kind, skew_ratio=0.5))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = common.partition(LABELS, args_for(partition=kind, skew_ratio=0.5, seed=1))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_classes_partition_gives_k_distinct_classes_when_numbers_divide():
    for clients, k in [(10, 2), (5, 2), (20, 3), (4, 5)]:
        parts = common.partition(LABELS, args_for(partition="classes", clients=clients, classes_per_client=k))
        check_disjoint_covering(parts, len(LABELS))
        counts = common.class_counts(LABELS, parts, 10)
        assert ((counts > 0).sum(1) == k).all()
        assert (counts.sum(0) == 100).all()


def test_classes_partition_falls_back_to_random_shards_with_a_note():
    notes = []
    parts = common.partition(LABELS, args_for(partition="classes", clients=7, classes_per_client=2), log=notes.append)
    check_disjoint_covering(parts, len(LABELS))
    assert len(parts) == 7 and notes and "not a multiple" in notes[0]
    assert ((common.class_counts(LABELS, parts, 10) > 0).sum(1) <= 4).all()


def test_dirichlet_min_size_and_skew_grows_as_alpha_shrinks():
    def skew(alpha):
        parts = common.partition(LABELS, args_for(partition="dirichlet", alpha=alpha, clients=5, min_client_size=20))
        assert min(len(p) for p in parts) >= 20
        c = common.class_counts(LABELS, parts, 10).astype(float)
        return (c.max(1) / c.sum(1)).mean()               # share of a client's dominant class
    assert skew(0.05) > skew(100.0) + 0.3


def test_skew_ratio_zero_is_label_sorted_and_one_is_iid():
    sorted_parts = common.partition(LABELS, args_for(partition="skew", clients=5, skew_ratio=0.0))
    assert ((common.class_counts(LABELS, sorted_parts, 10) > 0).sum(1) == 2).all()   # 2 classes each
    iid_parts = common.partition(LABELS, args_for(partition="skew", clients=5, skew_ratio=1.0))
    assert ((common.class_counts(LABELS, iid_parts, 10) > 0).sum(1) >= 9).all()


@pytest.mark.parametrize("kw, needle", [
    (dict(partition="iid", clients=2000), "more than the 1000 training images"),
    (dict(partition="classes", classes_per_client=11), "more than the 10 classes"),
    (dict(partition="dirichlet", alpha=0.001, clients=100, min_client_size=10), "no draw"),
])
def test_impossible_partitions_are_refused(kw, needle):
    with pytest.raises(common.UserError, match=needle):
        common.partition(LABELS, args_for(**kw))


def test_stratified_subset_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    idx = common.stratified_subset(labels, 100, seed=0)
    assert np.bincount(labels[idx]).tolist() == [40, 30, 20, 10]
    assert np.array_equal(idx, common.stratified_subset(labels, 100, seed=0))
    assert len(common.stratified_subset(labels, 0, seed=0)) == 1000


# --- augmentation ----------------------------------------------------------------------------

def fake_data(channels):
    x = torch.randint(0, 256, (8, channels, 28, 28), dtype=torch.uint8)
    mean, std = (0.5,) * channels, (0.25,) * channels
    return common.Data(x, torch.zeros(8, dtype=torch.long), x, torch.zeros(8, dtype=torch.long), 10, mean, std)


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_draws_per_image_parameters_and_a_seed_reproduces_a_batch(channels):
    data = fake_data(channels)
    aug = common.Augment(data)
    same = data.train_x[:1].repeat(6, 1, 1, 1)             # six copies of ONE image
    torch.manual_seed(0)
    out = aug(same)
    assert out.shape == (6, channels, 28, 28) and out.dtype == torch.float32
    assert not torch.allclose(out[0], out[1])               # different crops/colours within one batch
    assert len({round(v, 4) for v in out.flatten(1).sum(1).tolist()}) == 6
    torch.manual_seed(0)
    assert torch.equal(out, aug(same))                      # the seed reproduces the batch


def test_augment_plain_is_normalisation_only():
    data = fake_data(3)
    aug = common.Augment(data)
    x = data.train_x[:2]
    assert torch.allclose(aug.plain(x), (x.float() / 255 - 0.5) / 0.25)


def test_full_crop_without_jitter_is_identity_resampling():
    """With crop area 1 the affine grid must reproduce the image (up to flip): checks the geometry."""
    data = fake_data(1)
    aug = common.Augment(data, crop_min=1.0, strength=0.0, ratio=(1.0, 1.0))
    x = data.train_x[:4]
    out = aug(x) * 0.25 + 0.5
    ref = x.float() / 255
    for o, r in zip(out, ref):
        assert torch.allclose(o, r, atol=1e-4) or torch.allclose(o, r.flip(-1), atol=1e-4)


def reference_augment(aug, x_uint8, u):
    """The Augment docstring step by step, one image at a time, from the same 11 uniforms per image:
    crop + flip by F.affine_grid, then (p=0.8) brightness, contrast, saturation, hue as separate
    operations (hue: YIQ, rotate I/Q, inverse YIQ), clamp, (RGB, p=0.2) grayscale, normalise."""
    rgb = x_uint8.shape[1] == 3
    x = x_uint8.float() / 255
    b = len(x)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    area, log_r = aug.crop_min + (1 - aug.crop_min) * u[:, 0], lo + (hi - lo) * u[:, 1]
    w, h = (area * log_r.exp()).sqrt().clamp(max=1), (area / log_r.exp()).sqrt().clamp(max=1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = (1 - w) * (2 * u[:, 2] - 1), h, (1 - h) * (2 * u[:, 3] - 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                      padding_mode="reflection", align_corners=False)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

    def gray(y):
        return 0.299 * y[0:1] + 0.587 * y[1:2] + 0.114 * y[2:3]

    out = []
    for i in range(b):
        y = x[i]
        if u[i, 5] < 0.8:
            fb, fc, fs = (1 - aug.s + 2 * aug.s * u[i, k] for k in (7, 8, 9))
            y = y * fb                                                    # brightness
            m = (gray(y) if rgb else y).mean()
            y = (y - m) * fc + m                                          # contrast
            if rgb:
                y = (y - gray(y)) * fs + gray(y)                          # saturation
                a = (2 * u[i, 10] - 1) * aug.hue * 2 * math.pi            # hue: rotate the chroma plane
                c = torch.einsum("ij,jhw->ihw", yiq, y)
                c = torch.stack([c[0], a.cos() * c[1] - a.sin() * c[2], a.sin() * c[1] + a.cos() * c[2]])
                y = torch.einsum("ij,jhw->ihw", torch.linalg.inv(yiq), c)
        y = y.clamp(0, 1)
        if rgb and u[i, 6] < 0.2:
            y = gray(y).expand(3, -1, -1)
        out.append((y - aug.mean[0]) / aug.std[0])
    return torch.stack(out)


@pytest.mark.parametrize("channels", [1, 3])
def test_fused_augment_equals_the_step_by_step_definition(channels):
    """Augment composes the jitter into per-image matrices; the images must be those of the separate steps."""
    torch.manual_seed(1)
    x = torch.randint(0, 256, (64, channels, 28, 28), dtype=torch.uint8)
    data = common.Data(x, None, x, None, 10, (0.5,) * channels, (0.25,) * channels)
    aug = common.Augment(data, crop_min=0.2, strength=0.4, hue=0.1)
    torch.manual_seed(0)
    out = aug(x)
    torch.manual_seed(0)
    u = torch.rand(64, 11)                  # Augment draws all of a batch's numbers in this one call
    assert (u[:, 5] < 0.8).any() and (u[:, 5] >= 0.8).any() and (u[:, 4] < 0.5).any() and (u[:, 6] < 0.2).any()
    ref = reference_augment(aug, x, u)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()   # float rounding: ~3e-5


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_reused_optimizer_reset_in_place_trains_like_a_fresh_one(optimizer):
    """Three clients in turn, 3 steps each from the same global weights: an optimizer handed back by
    make_optimizer(reuse=...) gives bit-identical weights to a new optimizer per client."""
    args = common.RunArgs(optimizer=optimizer, lr=0.05, weight_decay=1e-4)
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    data = [torch.randn(3, 8, 6) for _ in range(3)]
    fresh, reused = copy.deepcopy(start), copy.deepcopy(start)
    kept = common.make_optimizer(list(reused.parameters()), args)
    for c, batches in enumerate(data):
        for model in (fresh, reused):
            model.load_state_dict(start.state_dict())                  # every client starts from the global model
            opt = common.make_optimizer(list(model.parameters()), args, lr=0.05 / (c + 1),
                                        reuse=kept if model is reused else None)
            for x in batches:
                opt.zero_grad(set_to_none=True)
                model(x).pow(2).sum().backward()
                opt.step()
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), reused.parameters())), c
        assert opt is kept and opt.param_groups[0]["lr"] == 0.05 / (c + 1)
    assert not torch.equal(fresh[0].weight, start[0].weight)
    with pytest.raises(ValueError):
        common.make_optimizer(list(start.parameters()), args, reuse=kept)


# --- encoders --------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder, norm", [("cnn", "bn"), ("cnn", "gnws"), ("resnet18", "bn")])
def test_folded_eval_copy_is_the_encoder_in_eval_mode(encoder, norm):
    """BatchNorm folded into the conv before it: same outputs as the encoder in eval mode, with trained
    (non-trivial) running statistics; the encoder itself stays as it was."""
    torch.manual_seed(0)
    net = common.make_encoder(SimpleNamespace(encoder=encoder, norm=norm), 3)
    for _ in range(3):                                       # running statistics away from 0 / 1
        net(torch.randn(8, 3, 32, 32) * 2 + 1)
    folded = common.folded_eval_copy(net)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert net.training
    with torch.no_grad():
        want = net.eval()(x)
    assert torch.allclose(folded(x), want, atol=1e-5, rtol=1e-4)
    if encoder == "cnn" and norm == "bn":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3



@pytest.mark.parametrize("encoder, norm", [("cnn", "bn"), ("cnn", "gnws"), ("resnet18", "bn"), ("resnet18", "gnws")])
def test_encoders_output_their_dim(encoder, norm):
    net = common.make_encoder(SimpleNamespace(encoder=encoder, norm=norm), 3)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, net.dim)
    if norm == "gnws":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert sum(isinstance(m, common.WSConv2d) for m in net.modules()) >= 3


def test_weight_standardised_conv_equals_conv_with_standardised_weight():
    conv = common.WSConv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    w = conv.weight
    w_std = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
    assert torch.allclose(conv(x), F.conv2d(x, w_std, padding=1), atol=1e-5)


# --- data ------------------------------------------------------------------------------------

class Py2Pickler(pickle._Pickler):
    """Pickles text and bytes alike as Python 2's byte strings (BINSTRING), as the CIFAR python-version files
    hold their keys and data: read with encoding="bytes" (ours) the keys are b"data", with "latin1"
    (torchvision's) they are "data"."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        head = pickle.SHORT_BINSTRING + bytes([len(b)]) if len(b) < 256 else pickle.BINSTRING + len(b).to_bytes(4, "little")
        self.write(head + b)
        self.memoize(obj)
    dispatch[str] = dispatch[bytes] = save_py2_str


def write_cifar10(folder, per_batch=20):
    """Small CIFAR-10 python-version pickles in the real on-disk format (Python 2 pickles, protocol 2)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
             "labels": [i % 10 for i in range(per_batch)], "batch_label": name}
        with open(folder / name, "wb") as f:
            Py2Pickler(f, protocol=2).dump(d)


def test_cifar10_loader_reads_the_pickled_format(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    tx, ty, vx, vy, k = common.load_cifar("cifar10", tmp_path)
    assert tx.shape == (100, 3, 32, 32) and tx.dtype == np.uint8 and vx.shape == (20, 3, 32, 32)
    assert k == 10 and ty.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    assert np.array_equal(tx[0, 0].flatten(), raw[:1024])      # channel-major rows, as the format says


def test_cifar100_loader_reads_fine_labels_from_the_archive(tmp_path):
    import tarfile
    src = tmp_path / "src" / "cifar-100-python"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):
        with open(src / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}, f)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar-100-python")
    tx, ty, vx, vy, k = common.load_cifar("cifar100", tmp_path)
    assert (tx.shape, k, ty.tolist()[-1], len(vy)) == ((30, 3, 32, 32), 100, 29, 10)


def test_missing_cifar_says_where_to_put_it(tmp_path):
    with pytest.raises(common.UserError, match=f"into {tmp_path}"):
        common.load_cifar("cifar10", tmp_path)


def test_bundled_fashion_mnist_verifies_and_matches_known_statistics():
    tx, ty, vx, vy, k = common.load_fmnist(common.ROOT / "data")
    assert tx.shape == (60000, 1, 28, 28) and vx.shape == (10000, 1, 28, 28)
    assert np.bincount(ty).tolist() == [6000] * 10
    assert tx.mean() / 255 == pytest.approx(0.2860, abs=1e-4)


def read_idx_gz(path):
    """The reader load_fmnist had before torchvision's layout: gzip, the IDX header, the uint8 data."""
    raw = gzip.open(path).read()
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(shape)


def test_torchvision_reads_the_bundled_fashion_mnist_and_gets_our_bytes(tmp_path):
    import shutil
    from torchvision.datasets import FashionMNIST
    raw = tmp_path / "FashionMNIST" / "raw"               # a fresh clone's data folder: the four .gz files only
    shutil.copytree(common.ROOT / "data" / "FashionMNIST" / "raw", raw, ignore=shutil.ignore_patterns("*-ubyte"))
    with pytest.raises(RuntimeError, match="Dataset not found"):
        FashionMNIST(tmp_path, download=False)
    tx, ty, vx, vy, k = common.load_fmnist(str(tmp_path))          # a str root, as torchvision takes it
    for got, name in ((tx[:, 0], "train-images-idx3-ubyte"), (ty, "train-labels-idx1-ubyte"),
                      (vx[:, 0], "t10k-images-idx3-ubyte"), (vy, "t10k-labels-idx1-ubyte")):
        want = read_idx_gz(raw / f"{name}.gz")
        assert got.dtype == want.dtype == np.uint8 and got.tobytes() == want.tobytes(), name   # the same bytes
    assert tx.flags.writeable and ty.flags.writeable     # torch.from_numpy takes them without a warning
    for train, x, y in ((True, tx, ty), (False, vx, vy)):    # load_fmnist unpacked them for torchvision's reader
        ds = FashionMNIST(tmp_path, train=train, download=False)
        assert ds.data.numpy().tobytes() == x[:, 0].tobytes() and ds.targets.numpy().tolist() == y.tolist()


def test_a_torchvision_download_passes_the_same_check(tmp_path):
    """torchvision's download keeps upstream's .gz (a file name in its header: other bytes, other MD5) beside
    the unpacked files; the check is on the content, so that root loads the same arrays."""
    import shutil
    ours = common.load_fmnist(common.ROOT / "data")
    shutil.copytree(common.ROOT / "data" / "FashionMNIST" / "raw", tmp_path, ignore=shutil.ignore_patterns("*.gz"),
                    dirs_exist_ok=True)
    name = "t10k-labels-idx1-ubyte"
    with open(tmp_path / name, "rb") as src, gzip.GzipFile(tmp_path / f"{name}.gz", "wb", mtime=1) as dst:
        dst.write(src.read())                            # GzipFile records the file name, as upstream's have
    (tmp_path / name).unlink()
    assert (tmp_path / f"{name}.gz").read_bytes() != (common.ROOT / "data/FashionMNIST/raw" / f"{name}.gz").read_bytes()
    theirs = common.load_fmnist(tmp_path)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ours[:4], theirs[:4]))


def test_corrupted_fashion_mnist_is_refused(tmp_path):
    for name in common.FMNIST_SHA256:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(b"not the file"))
    with pytest.raises(common.UserError, match="does not match its recorded SHA-256"):
        common.load_fmnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(common.UserError, match="train-images-idx3-ubyte.gz is not a readable .gz"):
        common.load_fmnist(tmp_path)
    with pytest.raises(common.UserError, match=r"missing \(the repository ships the four files in data/FashionMNIST/raw/"):
        common.load_fmnist(tmp_path / "nowhere")


def test_cifar10_loader_reads_what_torchvisions_cifar10_reads(tmp_path, monkeypatch):
    """Our reader and torchvision's CIFAR10(root) take the same folder and give the same images (ours N x C x H x W,
    torchvision's N x H x W x C) and labels; torchvision's MD5 check is switched off for the small test files."""
    from torchvision.datasets import CIFAR10
    write_cifar10(tmp_path / "cifar-10-batches-py")
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(CIFAR10, "_load_meta", lambda self: None)       # batches.meta: the class names only
    tx, ty, vx, vy, k = common.load_cifar("cifar10", tmp_path)
    for train, x, y in ((True, tx, ty), (False, vx, vy)):
        ds = CIFAR10(str(tmp_path), train=train, download=False)
        assert np.array_equal(ds.data, x.transpose(0, 2, 3, 1)) and ds.targets == y.tolist()


# --- command line ----------------------------------------------------------------------------

def test_help_text_comes_from_field_docstrings_and_preset_yields_to_flags():
    import fedavg_cl
    docs = common._field_docs(fedavg_cl.Args)
    assert docs["tau"].startswith("NT-Xent temperature") and "Dirichlet" in docs["alpha"]
    a = common.parse_args(fedavg_cl.Args, ["--preset", "paper", "--rounds", "3"])
    assert (a.dataset, a.encoder, a.rounds) == ("cifar10", "resnet18", 3)
    assert common.parse_args(fedavg_cl.Args, []).dataset == "fmnist"


def test_boolean_flags_stand_alone_and_switch_presets_yield_to_explicit_flags():
    import compare
    import dec_ssl
    assert common.parse_args(dec_ssl.Args, ["--featarc", "--clusters", "3"]).featarc is True
    assert common.parse_args(dec_ssl.Args, ["--featarc", "false"]).featarc is False
    quick = common.parse_args(compare.Args, ["--quick", "--rounds", "7"])
    assert (quick.rounds, quick.seeds) == (7, compare.Args.QUICK["seeds"])     # preset, then the flag
    assert common.parse_args(compare.Args, []).rounds == compare.Args().rounds
