"""--clip auto's column weights: the mean square of every linear layer's input on the scan prompt, checked against transformers."""

from __future__ import annotations

import pytest
import torch

from swtool import importance
from swtool.detect import DEFAULT_PROMPT
from swtool.formats.open import open_checkpoint
from swtool.model.tokenizer import encode


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.helpers import tiny

    directory = tmp_path_factory.mktemp("imp") / "model"
    built = tiny.build("llama", directory)
    tiny.plant(built, directory, [(1, 5, 17)])  # a massive input in column 17 of layer 1's down_proj
    return directory, built


def test_input_importance_is_the_damped_mean_square_of_each_linear_input(model):
    directory, built = model
    checkpoint = open_checkpoint(directory)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name + ".weight", args[0][0].pow(2).mean(dim=0)))
        for name, module in built.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    ]
    with torch.no_grad():
        built(torch.tensor([encode(checkpoint, DEFAULT_PROMPT)]))
    for hook in hooks:
        hook.remove()
    got = importance.input_importance(checkpoint)
    assert sorted(got) == sorted(seen) and len(got) == 4 * 7
    for name, mean_square in seen.items():
        expected = mean_square + importance.DAMPING * mean_square.mean()
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6, msg=name)
    down = got["model.layers.1.mlp.down_proj.weight"]
    assert int(down.argmax()) == 17 and float(down[17]) > 100 * float(down.median())  # the planted channel stands out
