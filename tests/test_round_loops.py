"""fedavg_cl.py and local_cl.py: the loss of a local step against NT-Xent computed on the same views, and
the round loop watched from inside (each function wrapped) against hand-computed expectations: which
client trains on which images, from which weights, with which optimizer state, and what the server keeps."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch

import common
import fedavg_cl
import local_cl
from conftest import SMALL, run_in_process


def fake_run(n=16, batches=1, seed=0):
    """Deterministic views and batches, so a reference can recompute exactly what local_update saw."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return SimpleNamespace(device=torch.device("cpu"), batches=lambda idx: list(idx.chunk(batches)),
                           two_views=lambda b: (x[b] + 0.1, x[b].flip(-1)))


@pytest.mark.parametrize("module", [fedavg_cl, local_cl])
def test_local_step_loss_is_nt_xent_of_the_two_views(module):
    torch.manual_seed(0)
    args = module.Args(tau=0.3, local_epochs=1, lr=1e-3)
    model = module.SimCLR(common.SmallCNN(1, width=8), 16)
    run, idx = fake_run(), torch.arange(16)
    z1, z2 = copy.deepcopy(model)(torch.cat(run.two_views(idx))).chunk(2)
    want = common.nt_xent(z1, z2, 0.3)
    if module is fedavg_cl:
        loss, images = module.local_update(model, run, idx, args)
    else:
        loss, images = module.local_update(model, common.make_optimizer(model.parameters(), args), run, idx, args)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and images == 32


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _weighted(states, sizes):
    """Hand-computed FedAvg of float entries: sum_i n_i w_i / sum_i n_i."""
    return {k: sum(n * s[k] for n, s in zip(sizes, states)) / sum(sizes)
            for k in states[0] if states[0][k].is_floating_point()}


def test_fedavg_round_loop_downloads_trains_each_client_on_its_own_images_and_averages(monkeypatch, tmp_path):
    calls, real = [], fedavg_cl.local_update

    def update(model, run, idx, args, opt=None):
        entry = _state(model)
        out = real(model, run, idx, args, opt)
        calls.append(dict(idx=idx.clone(), clients=run.clients, entry=entry, upload=_state(model)))
        return out

    monkeypatch.setattr(fedavg_cl, "local_update", update)
    folder = run_in_process(fedavg_cl, *SMALL, "--clients", "3", "--partition", "dirichlet", "--alpha", "0.5",
                            out=tmp_path / "runs", monkeypatch=monkeypatch)
    sizes = [c["size"] for c in json.loads((folder / "partition.json").read_text())["clients"]]
    assert len(set(sizes)) > 1 and len(calls) == 6                      # unequal clients, 2 rounds x 3
    for i, call in enumerate(calls):
        assert torch.equal(call["idx"], call["clients"][i % 3])          # client c trains on its own images
    r1, r2 = calls[:3], calls[3:]
    for k, want in _weighted([c["upload"] for c in r1], sizes).items():
        for c in r2:                                                     # every client downloads the average
            assert torch.allclose(c["entry"][k], want, atol=1e-6), k
        assert all(torch.equal(c["entry"][k], r1[0]["entry"][k]) for c in r1)
    model = torch.load(folder / "checkpoint.pt", weights_only=False)["state"]["model"]
    for k, want in _weighted([c["upload"] for c in r2], sizes).items():
        assert torch.allclose(model[k], want, atol=1e-6), k
    assert any(not torch.equal(model[k], r2[0]["entry"][k]) for k in model)   # round 2 changed the model


def test_local_cl_clients_keep_their_own_model_and_optimizer_across_rounds(monkeypatch, tmp_path):
    calls, real = [], local_cl.local_update

    def update(model, opt, run, idx, args):
        entry = (_state(model), copy.deepcopy(opt.state_dict()))
        out = real(model, opt, run, idx, args)
        calls.append(dict(idx=idx.clone(), clients=run.clients, entry=entry,
                          exit=(_state(model), copy.deepcopy(opt.state_dict()))))
        return out

    monkeypatch.setattr(local_cl, "local_update", update)
    run_in_process(local_cl, *SMALL, "--clients", "2", "--optimizer", "sgd", out=tmp_path / "runs", monkeypatch=monkeypatch)
    assert len(calls) == 4
    for i, call in enumerate(calls):
        assert torch.equal(call["idx"], call["clients"][i % 2])
    for c in (0, 1):
        first, second = calls[c], calls[2 + c]
        for k, v in first["exit"][0].items():                          # no server: round 2 starts where round 1 ended
            assert torch.equal(second["entry"][0][k], v), (c, k)
        bufs = second["entry"][1]["state"]                             # SGD momentum buffers carried over
        assert bufs and all(torch.equal(b["momentum_buffer"], first["exit"][1]["state"][j]["momentum_buffer"])
                            for j, b in bufs.items())
        assert all(b["momentum_buffer"].abs().sum() > 0 for b in bufs.values())
    k = next(iter(calls[0]["exit"][0]))
    assert not torch.equal(calls[0]["exit"][0][k], calls[1]["exit"][0][k])   # two clients, two models
