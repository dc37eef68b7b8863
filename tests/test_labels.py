"""Feature labels: prompt words, a vision-language model (against a real local HTTP server), CLIP; one store."""
from __future__ import annotations

import json
import logging
import socket

import pytest
import torch
from PIL import Image

from fake_openai_server import COLOURS, FakeOpenAIServer
from sae_core.errors import InputError
from sae_core.labels import (ClipSource, FeatureEvidence, Label, LabelStore, VLMSource, WordsSource, clip_label,
                             label_features, label_from_words)
from sae_core.vlm import KEY_ENV, VLMClient, VLMFailure, api_root, clean_label, parse_picks

KEY = "sk-test-0123456789-secret"
COLOUR_ORDER = ("red", "green", "blue", "yellow")


def square(colour: str, shade: int = 0) -> Image.Image:
    r, g, b = COLOURS[colour]
    return Image.new("RGB", (24, 24), (max(0, r - shade), max(0, g - shade), max(0, b - shade)))


def colour_features(colours=COLOUR_ORDER, per_feature: int = 5) -> list[FeatureEvidence]:
    return [FeatureEvidence(i, images=[square(colour, 4 * k) for k in range(per_feature)])
            for i, colour in enumerate(colours)]


def vlm_source(server: FakeOpenAIServer, **client_options) -> VLMSource:
    options = {"timeout": 5.0, "max_retries": 1, "sleep": lambda seconds: None, **client_options}
    return VLMSource(VLMClient(server.base_url, "fake-vlm", **options), shown=3, held_out=2, distractors=3, seed=7)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the VLM source -------------------------------------------------------------------------------------------

def test_vlm_labels_name_the_colour_each_feature_fires_on_and_score_it_perfectly(tmp_path):
    features = colour_features()
    with FakeOpenAIServer() as server:
        labels = label_features(features, vlm_source(server), LabelStore(tmp_path))
    assert [label.text for label in labels] == [f"A {colour} square" for colour in COLOUR_ORDER]
    assert all(label.ok and label.score == 1.0 and label.source == "vlm" for label in labels)
    assert LabelStore(tmp_path).labels("vlm") == labels  # what was written reads back


def test_describe_shows_only_the_images_not_held_out_for_the_judge(tmp_path):
    features = colour_features()
    with FakeOpenAIServer() as server:
        source = vlm_source(server)
        shown, held = source.split(features[0])
        label_features(features, source, LabelStore(tmp_path))
        describe, judge = server.requests[:2]
    assert len(shown) == 3 and len(held) == 2
    assert not {id(image) for image in shown} & {id(image) for image in held}
    assert _image_count(describe) == 3 and _image_count(judge) == 2 + 3  # held out + one image of each other feature


def test_the_score_is_high_for_the_true_label_and_low_for_a_wrong_one():
    features = colour_features()
    red = features[0]
    with FakeOpenAIServer() as server:
        source = vlm_source(server)
        right = source.score("a red square", red, features)
        wrong = source.score("a blue square", red, features)
        unrelated = source.score("a cat", red, features)
    assert right == 1.0
    assert wrong < 0.5  # misses every red image and picks the blue distractor
    assert unrelated == 0.5  # picks nothing: chance


def test_the_judges_mix_is_the_same_for_the_same_seed_and_differs_for_another():
    features = colour_features(per_feature=8)
    with FakeOpenAIServer() as server:
        client = VLMClient(server.base_url, "fake-vlm")
        for seed in (3, 3, 4):
            VLMSource(client, shown=3, held_out=4, distractors=3, seed=seed).score("a red square", features[0], features)
        first, again, other = (request.raw for request in server.requests)
    assert first == again
    assert first != other


def test_a_feature_alone_or_with_one_image_gets_a_label_without_a_score():
    with FakeOpenAIServer() as server:
        source = vlm_source(server)
        alone = source.label(colour_features()[0], colour_features()[:1])
        single = source.label(FeatureEvidence(0, images=[square("green")]), colour_features())
    assert alone.ok and alone.text == "A red square" and alone.score is None
    assert single.ok and single.text == "A green square" and single.score is None


def test_each_failure_gives_its_status_and_the_run_goes_on_and_a_rerun_retries_only_the_failures(tmp_path):
    colours = ("red", "green", "blue", "yellow", "red", "green", "blue", "yellow", "red")
    features = colour_features(colours)
    with FakeOpenAIServer(slow_seconds=5.0) as server:
        server.queue("refuse", "content_filter", "empty", "not_json", "no_choices", "server_error", "slow",
                     "rate_limit", "rate_limit")  # max_retries=1: two 429s in a row give up
        labels = label_features(features, vlm_source(server, timeout=1.0), LabelStore(tmp_path))
        assert [label.status for label in labels] == ["refused", "refused", "refused", "malformed", "malformed",
                                                      "error", "timeout", "rate_limited", "ok"]
        assert "HTTP 500" in labels[5].detail and labels[8].text == "A red square"
        assert all(label.detail for label in labels[:8])
        before = len(server.requests)
        again = label_features(features, vlm_source(server), LabelStore(tmp_path))
        assert len(server.requests) - before == 8 * 2  # describe + judge for each failed feature, none for the ok one
    assert all(label.ok for label in again)
    assert [label.text for label in again] == [f"A {colour} square" for colour in colours]


def test_images_given_as_files_are_read_when_sent_and_a_missing_file_fails_only_its_feature(tmp_path):
    features = []
    for i, colour in enumerate(COLOUR_ORDER):
        paths = [tmp_path / f"{i}_{k}.png" for k in range(4)]
        for k, path in enumerate(paths):
            square(colour, 4 * k).save(path)
        features.append(FeatureEvidence(i, images=paths))
    (tmp_path / "1_0.png").unlink()
    with FakeOpenAIServer() as server:
        labels = label_features(features, vlm_source(server), LabelStore(tmp_path / "index"))
    assert [label.status for label in labels] == ["ok", "error", "ok", "ok"]
    assert "1_0.png" in labels[1].detail
    assert [labels[i].text for i in (0, 2, 3)] == ["A red square", "A blue square", "A yellow square"]


def test_a_refused_connection_reads_as_timeout(tmp_path):
    client = VLMClient(f"http://127.0.0.1:{closed_port()}/v1", "fake-vlm", timeout=2.0)
    labels = label_features(colour_features()[:2], VLMSource(client), LabelStore(tmp_path))
    assert [label.status for label in labels] == ["timeout", "timeout"]
    assert "is the server running" in labels[0].detail


def test_a_judge_failure_keeps_the_label_but_not_the_ok(tmp_path):
    with FakeOpenAIServer() as server:
        server.queue("ok", "not_json")  # describe answers, judge does not
        label = label_features(colour_features()[:2], vlm_source(server), LabelStore(tmp_path))[0]
    assert label.status == "malformed" and label.text == "A red square" and label.detail.startswith("scoring:")


@pytest.mark.parametrize("retry_after, waited", [("2", [2.0]), ("3600", [30.0]), (None, [1.0])])
def test_a_rate_limited_request_waits_as_asked_within_bounds_then_succeeds(retry_after, waited):
    sleeps: list[float] = []
    with FakeOpenAIServer(retry_after=retry_after) as server:
        server.queue("rate_limit")
        client = VLMClient(server.base_url, "fake-vlm", max_retries=2, max_retry_wait=30.0, sleep=sleeps.append)
        assert client.describe([square("blue")]) == "A blue square"
    assert sleeps == waited


def test_a_killed_run_resumes_without_redoing_finished_features(tmp_path):
    features = colour_features()

    def killed_after_two(done: int, total: int, label: Label) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with FakeOpenAIServer() as server:
        with pytest.raises(KeyboardInterrupt):
            label_features(features, vlm_source(server), LabelStore(tmp_path), progress=killed_after_two)
        assert len(server.requests) == 2 * 2
        saved = LabelStore(tmp_path)
        assert [saved.get(i, "vlm").status for i in range(4)] == ["ok", "ok", "pending", "pending"]
        assert saved.needs_label(range(4), "vlm") == [2, 3]
        progress: list[tuple[int, int]] = []
        labels = label_features(features, vlm_source(server), saved, lambda done, total, _: progress.append((done, total)))
        assert len(server.requests) == 4 * 2
    assert progress == [(1, 2), (2, 2)]
    assert [label.text for label in labels] == [f"A {colour} square" for colour in COLOUR_ORDER]


def test_each_label_is_on_disk_before_the_next_feature_is_asked_for(tmp_path):
    on_disk: list[list[str]] = []

    def look_at_the_file(done: int, total: int, label: Label) -> None:
        on_disk.append([reread.status for reread in LabelStore(tmp_path).labels("vlm")])

    with FakeOpenAIServer() as server:
        label_features(colour_features()[:3], vlm_source(server), LabelStore(tmp_path), look_at_the_file, save_every=0)
    assert on_disk == [["ok", "pending", "pending"], ["ok", "ok", "pending"], ["ok", "ok", "ok"]]


def test_a_fast_source_saves_the_file_a_few_times_not_once_per_feature(tmp_path):
    saves = []

    class CountingStore(LabelStore):
        def save(self) -> None:
            saves.append(len(self.labels()))
            super().save()

    features = [FeatureEvidence(i, words=[(f"word{i}", 1.0)]) for i in range(500)]
    labels = label_features(features, WordsSource(), CountingStore(tmp_path), save_every=3600)
    assert saves == [500, 500]  # the pending list, then the end
    assert LabelStore(tmp_path).labels("words") == labels and labels[499].text == "word499"


# --- the API key ------------------------------------------------------------------------------------------------

def test_the_api_key_travels_only_in_the_authorization_header(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAIServer() as server:
        label_features(colour_features()[:2], vlm_source(server), LabelStore(tmp_path))
    assert server.requests
    for request in server.requests:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        others = {name: value for name, value in request.headers.items() if name != "authorization"}
        assert KEY not in json.dumps(others) and KEY.encode() not in request.raw and KEY not in request.path


def test_without_a_key_no_authorization_header_is_sent(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeOpenAIServer() as server:
        VLMClient(server.base_url, "fake-vlm").describe([square("red")])
    assert "authorization" not in server.requests[0].headers


def test_the_api_key_never_reaches_labels_logs_reprs_or_errors(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer() as server:
        client = VLMClient(server.base_url, "fake-vlm", api_key=KEY, max_retries=0)
        server.queue("server_error", "rate_limit", "not_json", "refuse")  # the 500 page echoes the request headers
        label_features(colour_features(), VLMSource(client, shown=3, held_out=2, distractors=3), LabelStore(tmp_path))
        server.queue("server_error")
        with pytest.raises(VLMFailure) as failure:
            client.describe([square("red")])
        assert "[key]" in str(failure.value)  # the echoed header was masked, not dropped silently
    texts = [(tmp_path / "labels.json").read_text(), caplog.text, repr(client), str(client), str(failure.value),
             repr(failure.value), *(str(record.args) for record in caplog.records)]
    assert "HTTP 500" in texts[0] and caplog.records  # the failures were written and logged
    assert not [text for text in texts if KEY[:10] in text]


def test_a_key_echoed_past_the_reads_cut_leaves_no_piece_of_itself():
    long_key = "sk-" + "".join(f"{i:04d}" for i in range(1250))  # longer than the 4 KiB of error page read
    with FakeOpenAIServer() as server:
        server.queue("server_error")
        with pytest.raises(VLMFailure) as failure:
            VLMClient(server.base_url, "fake-vlm", api_key=long_key).describe([square("red")])
    assert "HTTP 500" in str(failure.value) and str(failure.value).endswith("[key]")
    assert long_key[:8] not in str(failure.value)


def test_a_redirect_is_not_followed_so_the_key_goes_nowhere_else():
    with FakeOpenAIServer() as server:
        server.queue("redirect")
        with pytest.raises(VLMFailure) as failure:
            VLMClient(server.base_url, "fake-vlm", api_key=KEY).describe([square("red")])
    assert failure.value.status == "error" and "HTTP 302" in str(failure.value) and "redirects" in str(failure.value)
    assert [request.path for request in server.requests] == ["/v1/chat/completions"]


def test_a_local_server_is_reached_directly_even_with_a_proxy_set(monkeypatch):
    dead_proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with FakeOpenAIServer() as server:
        client = VLMClient(server.base_url.replace("127.0.0.1", "localhost"), "fake-vlm")
        assert client.describe([square("red")]) == "A red square"


# --- base URLs and reply parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("given, root", [
    ("http://localhost:11434", "http://localhost:11434/v1"),
    ("http://localhost:11434/", "http://localhost:11434/v1"),
    ("http://localhost:8080/v1/", "http://localhost:8080/v1"),
    ("https://openrouter.ai/api/v1", "https://openrouter.ai/api/v1"),
])
def test_a_base_url_without_a_path_gets_v1_and_one_with_a_path_is_kept(given, root):
    assert api_root(given) == root


@pytest.mark.parametrize("bad", ["localhost:11434", "ftp://host/v1", "", "http://"])
def test_a_base_url_that_is_not_http_is_refused_with_an_example(bad):
    with pytest.raises(InputError, match="http://localhost:11434/v1"):
        VLMClient(bad, "llava")


def test_an_unknown_route_is_an_error_naming_the_status_and_the_fix():
    with FakeOpenAIServer() as server:
        client = VLMClient(server.base_url.replace("/v1", "/api"), "fake-vlm")
        with pytest.raises(VLMFailure) as failure:
            client.describe([square("red")])
    assert failure.value.status == "error" and "HTTP 404" in failure.value.detail and "base_url" in failure.value.detail


@pytest.mark.parametrize("reply, label", [
    ("a red square", "a red square"),
    ('"A red square."', "A red square"),
    ("**Label:** `striped fur`\n\nThe images all show...", "striped fur"),
    ("<think>red things, maybe apples</think>\nRed apples", "Red apples"),
    ("- dog faces", "dog faces"),
    ("word " * 40, "word word word word word word word word word word word word"),
    ("   \n  ", ""),
])
def test_a_reply_is_cleaned_to_one_short_line(reply, label):
    assert clean_label(reply) == label
    assert len(clean_label(reply)) <= 60


@pytest.mark.parametrize("reply, picks", [
    ("[1, 3]", [0, 2]),
    ("The matching images are [2, 4].", [1, 3]),
    ('["1", "2"]', [0, 1]),
    ("[1, 3, 9, 0]", [0, 2]),  # outside 1..4 dropped
    ("[]", []),
    ("None of them match.", []),
    ("[1, 2", None),
    ("images 1 and 2", None),
    ("[1, dog]", None),
    ("['1', '2']", [0, 1]),
])
def test_judge_replies_are_parsed_tolerantly_and_nonsense_is_malformed(reply, picks):
    if picks is None:
        with pytest.raises(VLMFailure) as failure:
            parse_picks(reply, 4)
        assert failure.value.status == "malformed"
    else:
        assert parse_picks(reply, 4) == picks


# --- the words and CLIP sources, and the store -----------------------------------------------------------------

def test_words_give_the_top_words_and_their_share_of_the_association():
    label = label_from_words([("dog", 3.0), ("puppy", 2.0), ("grass", 0.5), ("sky", 0.5), ("the", -1.0)], feature=5)
    assert (label.feature, label.text, label.source, label.ok) == (5, "dog, puppy", "words", True)
    assert label.score == pytest.approx(5.0 / 6.0)
    diffuse = label_from_words([(f"word{i}", 1.0) for i in range(12)])
    assert diffuse.text == "word0, word1, word10" and diffuse.score == pytest.approx(3 / 12)


def test_words_without_a_positive_association_give_an_error_label_and_bad_entries_are_refused():
    assert label_from_words([("a", 0.0), ("b", float("nan"))]).status == "error"
    assert label_from_words([]).status == "error"
    with pytest.raises(InputError, match="not a \\(word, score\\) pair"):
        label_from_words([("dog", "lots")])
    with pytest.raises(InputError, match="does not start with a word"):
        label_from_words([(3, 1.0)])


def test_clip_picks_the_word_nearest_the_mean_image_embedding():
    vocabulary = ["red", "green", "blue"]
    text = torch.eye(3, 4)
    images = torch.tensor([[0.1, 1.0, 0.0, 0.2], [0.0, 2.0, 0.1, -0.2]])  # both point at "green", lengths differ
    label = clip_label(images, text, vocabulary, feature=9)
    assert (label.feature, label.text, label.source) == (9, "green", "clip")
    assert label.score > 0.99
    close_call = clip_label(torch.tensor([[1.0, 0.99, 0.0, 0.0]]), text, vocabulary)
    assert close_call.text == "red" and 0.5 < close_call.score < 0.99


@pytest.mark.parametrize("images, text, vocabulary, message", [
    (torch.ones(2, 3), torch.eye(3, 4), ["a", "b", "c"], "same CLIP model"),
    (torch.ones(2, 4), torch.eye(3, 4), ["a", "b"], "embed every vocabulary word"),
    (torch.ones(0, 4), torch.eye(3, 4), ["a", "b", "c"], "non-empty"),
    (torch.ones(4), torch.eye(3, 4), ["a", "b", "c"], "non-empty"),
    (torch.full((1, 4), float("nan")), torch.eye(3, 4), ["a", "b", "c"], "NaN"),
])
def test_clip_inputs_that_do_not_fit_are_refused(images, text, vocabulary, message):
    with pytest.raises(InputError, match=message):
        clip_label(images, text, vocabulary)


def test_sources_keep_their_labels_side_by_side_in_one_file(tmp_path):
    features = [FeatureEvidence(0, words=[("dog", 2.0)], image_embeddings=torch.tensor([[0.0, 1.0]])),
                FeatureEvidence(1, words=[("sky", 1.0)])]
    store = LabelStore(tmp_path)
    label_features(features, WordsSource(), store)
    clip = label_features(features, ClipSource(torch.eye(2), ["red", "green"]), store)
    reread = LabelStore(tmp_path)
    assert {source: label.text for source, label in reread.of_feature(0).items()} == {"words": "dog", "clip": "green"}
    assert clip[1].status == "error" and "no CLIP image embeddings" in clip[1].detail
    assert reread.needs_label([0, 1], "clip") == [1] and reread.needs_label([1, 0, 1], "words") == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels.json"]  # no temp file left behind


@pytest.mark.parametrize("content, why", [
    ("{not json", "not JSON"),
    ('{"format": "other"}', "not a diffusion-sae-labels file"),
    ('{"format": "diffusion-sae-labels", "version": 1, "features": {"x": {}}}', "not a feature id"),
    ('{"format": "diffusion-sae-labels", "version": 1, "features": {"3": {"vlm": {"status": "great"}}}}', "status"),
    ('{"format": "diffusion-sae-labels", "version": 1, "features": {"3": {"vlm": {"score": 7}}}}', "score"),
])
def test_a_damaged_labels_file_is_refused_naming_it_and_the_fix(tmp_path, content, why):
    (tmp_path / "labels.json").write_text(content)
    with pytest.raises(InputError, match=why) as failure:
        LabelStore(tmp_path)
    assert "labels.json" in str(failure.value) and "delete it" in str(failure.value)


def test_a_labels_file_of_another_version_is_refused_with_the_fix(tmp_path):
    (tmp_path / "labels.json").write_text('{"format": "diffusion-sae-labels", "version": 9, "features": {}}')
    with pytest.raises(InputError, match="version 9.*update it"):
        LabelStore(tmp_path)


def test_numpy_numbers_make_plain_labels_that_save_as_json(tmp_path):
    import numpy as np

    label = Label(np.int64(4), "dog", "words", score=np.float32(0.25))
    assert type(label.feature) is int and type(label.score) is float
    LabelStore(tmp_path).put(label)
    assert LabelStore(tmp_path).get(4, "words") == label
    huge = label_from_words([("a", 1e308), ("b", 1e308), ("c", 1e308), ("d", 1e308)])
    assert huge.score == pytest.approx(0.75)


def test_a_label_outside_the_interface_is_refused():
    with pytest.raises(InputError, match="source"):
        Label(0, "x", "ouija")
    with pytest.raises(InputError, match="score"):
        Label(0, "x", "words", score=1.5)


def _image_count(request) -> int:
    return sum(part["type"] == "image_url" for part in request.body["messages"][-1]["content"])

