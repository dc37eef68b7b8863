"""The one recorder every front end uses: what it keeps, how it seeds token subsets, how it stores."""
import math

import pytest
import torch

from sae_core import ActivationBuffer, ShardReader, ShardWriter, Site
from sae_core.errors import ConfigError
from sae_core.recording import Recorder, write_records
from sae_core.sites import SiteContext

SITE = Site(family="flux", block="double_blocks.0", stream="image")


def ctx(sigma=1.0, progress=0.5, cond=None, grid=(2, 4)):
    return SiteContext(sigma=sigma, progress=progress, cond=cond, grid=grid)


def activations(batch, tokens=8, d=3, offset=0.0):
    return torch.arange(batch * tokens * d, dtype=torch.float32).reshape(batch, tokens, d) + offset


def test_the_recorder_returns_its_input_untouched():
    h = activations(2)
    assert Recorder()(h, ctx()) is h


def test_only_the_prompts_rows_are_kept_under_guidance():
    recorder = Recorder()
    recorder.begin([10, 11])
    h = activations(4)  # [uncond 10, uncond 11, cond 10, cond 11]
    recorder(h, ctx(cond=torch.tensor([False, False, True, True])))
    record, = recorder.take()
    assert torch.equal(record.acts, h[2:]) and record.rows.tolist() == [0, 1]


def test_a_sample_keeps_the_same_token_subset_whatever_batch_it_is_generated_in():
    alone, batched = Recorder(tokens_per_image=3, seed=7), Recorder(tokens_per_image=3, seed=7)
    alone.begin([5])
    batched.begin([4, 5, 6])
    for _ in range(2):  # two sampling steps
        alone(activations(1), ctx())
        batched(activations(3), ctx())
    for a, b in zip(alone.take(), batched.take()):
        assert torch.equal(a.tokens[0], b.tokens[1])
        assert not torch.equal(b.tokens[0], b.tokens[1])  # other samples draw other subsets


def test_a_token_fraction_keeps_that_share_of_each_rows_tokens():
    recorder = Recorder(token_fraction=0.25)
    recorder(activations(2, tokens=8), ctx())
    assert recorder.take()[0].acts.shape == (2, 2, 3)


def test_an_unknown_sigma_is_stored_as_nan_not_zero():
    recorder = Recorder()
    recorder(activations(1), ctx(sigma=None))
    assert math.isnan(recorder.take()[0].sigma)


def test_keep_first_and_last_keep_one_call_and_the_window_gates_the_rest():
    first, last = Recorder(keep="first", window=(0.5, 1.0)), Recorder(keep="last")
    for step, progress in enumerate((0.0, 0.5, 1.0)):
        first(activations(1, offset=step), ctx(progress=progress))
        last(activations(1, offset=step), ctx(progress=progress))
    assert first.take()[0].progress == 0.5
    assert last.take()[0].progress == 1.0


def test_mean_pooling_keeps_one_vector_per_row_marked_as_pooled():
    recorder = Recorder(pool="mean")
    h = activations(2)
    recorder(h, ctx())
    record, = recorder.take()
    assert torch.equal(record.acts, h.mean(dim=1, keepdim=True)) and record.tokens.tolist() == [[-1], [-1]]


def test_records_are_written_sample_by_sample_and_a_resume_skips_stored_samples(tmp_path):
    recorder = Recorder()
    recorder.begin([3, 4])
    for step in range(2):
        recorder(activations(2, offset=100 * step), ctx(sigma=2.0 - step))
    records = recorder.take()
    with ShardWriter(tmp_path, SITE, dtype=torch.float32, whole_adds=True) as writer:
        added = write_records(writer, records, torch.tensor([3, 4]), resume_from=4)
    assert added == 2 * 8  # sample 3 was already stored: only sample 4's two calls
    stored = [rows["sample_id"] for rows in ShardReader(tmp_path, batch_size=16, shuffle=False)]
    assert set(torch.cat(stored).tolist()) == {4}
    buffer = ActivationBuffer(1000)
    write_records(buffer, records, torch.tensor([3, 4]))
    rows = buffer.tensors()
    assert rows["sample_id"][:16].tolist() == [3] * 16  # every call of sample 3 first
    assert torch.equal(rows["activations"][:8], activations(2)[0])
    assert rows["timestep"][:16].unique().tolist() == [1.0, 2.0]


@pytest.mark.parametrize("kwargs", [{"keep": "middle"}, {"pool": "max"}, {"tokens_per_image": 0},
                                    {"token_fraction": 1.5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        Recorder(**kwargs)


def test_a_streaming_recorder_hands_each_call_on_and_keeps_nothing():
    seen = []
    recorder = Recorder(stream=seen.append, tokens_per_image=2)
    recorder.begin([0])
    for step in range(3):
        recorder(activations(1), ctx(sigma=3.0 - step))
    assert [r.sigma for r in seen] == [3.0, 2.0, 1.0] and recorder.records == []
    assert all(r.acts.shape == (1, 2, 3) for r in seen)
