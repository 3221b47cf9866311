import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="QAT needs the torch extra (bash scripts/setup.sh installs it)")

from edgepack.quantize.qat import observe_activations, unwrap_linears, wrap_linears  # noqa: E402


def test_fake_quant_wrappers_train_and_come_off_cleanly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    ref = [p.detach().clone() for p in model.parameters()]
    assert wrap_linears(torch, model) == 2
    hooks = observe_activations(torch, model)
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]  # gradients flow through the fake quantizers (straight-through)
    model.eval()
    with torch.no_grad():
        out_q = model(x)
        # outputs of a fake-quantized LayerNorm sit on an INT8 grid of at most 256 levels
        ln_out = model[1](model[0](x))
        assert len(torch.unique(ln_out)) <= 256
    unwrap_linears(torch, model)
    for h in hooks:
        h.remove()
    assert all(isinstance(m, torch.nn.Linear) for m in (model[0], model[3]))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(ref, model.parameters()))
    with torch.no_grad():
        assert np.isfinite(model(x).numpy()).all() and out_q.shape == (64, 3)
