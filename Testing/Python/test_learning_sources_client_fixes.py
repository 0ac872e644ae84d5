"""Review B fixes in the prompt mix, the import's source finding and the learning client.

- A session opened on a mask (a ``/next`` proposal, an existing segment) has no first prompt: its
  prompts are corrections, and only sessions begun from nothing shape the first-kind weights.
- nnU-Net's per-channel files ``<case>_NNNN`` are one case per ``<case>`` (channel 0), not one case
  (and subject) per channel; BraTS ``<id>_seg``, KiTS ``segmentation`` and LiTS ``segmentation-N`` are
  label maps, not images to annotate, while images merely named alike are still imported.
- The client sends a ``CaseStatus`` by its value, refuses a proposal box that lies outside the case
  (a negative offset too) or declares more data than the box holds, before decompressing it, and
  checks ``wait_for_job``'s ``poll_s``.
"""

from __future__ import annotations

import base64
import json
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import pytest
from http_fakes import QuietHandler, serving
from test_server_fixtures import TOKENS
from test_store_label_sources import image, label

from SegAssistLib.api_models import ArrayPayload
from SegAssistLib.cli import main
from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import ProtocolError
from SegAssistLib.image import Volume
from SegAssistLib.learning.prompt_mix import DEFAULT_MIX, DEFAULT_SHARE, mix_from_logs
from SegAssistLib.learning.records import CaseStatus
from SegAssistLib.learning.sources import find_sources
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import BoxPrompt, MaskPrompt, PointPrompt, ScribblePrompt
from SegAssistLib.training import simulation

pytest_plugins = ["test_server_fixtures"]

# ---- 3: the prompt mix of sessions that open on a proposal ------------------------------------------------

PROPOSAL = MaskPrompt.from_array(np.ones((4, 4, 4), np.uint8), made_by="0.3.0+v2")
ERASE = ScribblePrompt(points=[(1, 1, 1), (2, 2, 1)], positive=False)
FIX = PointPrompt(position=(2, 2, 2), positive=False)
HALF_SCRIBBLES = (1 - DEFAULT_SHARE) * 0.5 + DEFAULT_SHARE * simulation.CORRECTION_SCRIBBLE_SHARE  # half the fixes


def test_a_session_from_a_proposal_counts_its_prompts_as_corrections_not_as_a_first_prompt():
    mix = mix_from_logs([PromptLog(prompts=[PROPOSAL, ERASE, FIX]) for _ in range(10)])
    assert (mix.sessions, mix.first_prompt_sessions) == (10, 0)
    assert mix.first_kind_weights == DEFAULT_MIX.first_kind_weights  # no first prompt was observed
    assert sum(mix.first_kind_weights.values()) == pytest.approx(1.0)
    # corrections: 10 scribbles, 10 clicks
    assert mix.correction_scribble_share == pytest.approx(HALF_SCRIBBLES)


def test_only_sessions_begun_from_nothing_shape_the_first_kind_weights():
    box = BoxPrompt(min_corner=(1, 2, 3), max_corner=(9, 9, 9))
    existing_segment = MaskPrompt.from_array(np.ones((3, 3, 3), np.uint8))  # no maker: drawn by hand
    empty = MaskPrompt.from_array(np.zeros((5, 5, 5), np.uint8))  # a cleared mask: a start from nothing
    logs = [
        PromptLog(prompts=[box, FIX]),  # first kind box3d, one click
        PromptLog(prompts=[existing_segment, ERASE]),  # one scribble correction
        PromptLog(prompts=[empty, FIX, ERASE]),  # first kind point, one scribble
        PromptLog(prompts=[PROPOSAL, FIX]),  # one click correction
    ]
    mix = mix_from_logs(logs)
    assert (mix.sessions, mix.first_prompt_sessions) == (4, 2)
    keep, default = 1 - DEFAULT_SHARE, DEFAULT_MIX.first_kind_weights
    assert mix.first_kind_weights["box3d"] == pytest.approx(keep / 2 + DEFAULT_SHARE * default["box3d"])
    assert mix.first_kind_weights["point"] == pytest.approx(keep / 2 + DEFAULT_SHARE * default["point"])
    assert mix.first_kind_weights["scribble"] == pytest.approx(DEFAULT_SHARE * default["scribble"])
    # corrections: click, scribble, scribble, click
    assert mix.correction_scribble_share == pytest.approx(HALF_SCRIBBLES)
    assert mix.to_dict()["first_prompt_sessions"] == 2


# ---- 6: nnU-Net channel files and public label-map names ----------------------------------------------

SHAPE = (6, 8, 10)


def _names(source: Path, **kwargs: Any) -> Tuple[List[str], List[str]]:
    passed: List[Tuple[Path, str]] = []
    found = find_sources(source, passed_over=passed, **kwargs)
    return [name for _, name in found], sorted(path.name for path, _ in passed)


def _nnunet(root: Path, cases: List[str], channels: int, labels: bool = True) -> Path:
    for n, case in enumerate(cases):
        for channel in range(channels):
            image(root / "imagesTr" / f"{case}_{channel:04d}.nii.gz", 10 * n + channel)
        if labels:
            label(root / "labelsTr" / f"{case}.nii.gz", 0)
    return root


def test_an_nnunet_dataset_is_one_case_per_patient_from_channel_0(tmp_path: Path, capsys):
    source = _nnunet(tmp_path / "brats", ["pat1", "pat2"], channels=2)
    names, passed = _names(source)
    assert names == ["pat1", "pat2"]
    assert passed == ["labelsTr", "pat1_0001.nii.gz", "pat2_0001.nii.gz"]
    assert _names(source, channel=1)[0] == ["pat1", "pat2"]  # the other channel's files, when asked
    assert [path.name for path, _ in find_sources(source, channel=1)] == ["pat1_0001.nii.gz", "pat2_0001.nii.gz"]

    code = main(["learn", "import", str(source), "--store", str(tmp_path / "store"), "--user", "admin", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert sorted(c["name"] for c in report["added"]) == ["pat1", "pat2"]  # two patients, two cases
    assert sorted(c["source"].rsplit("/", 1)[-1] for c in report["added"]) == ["pat1_0000.nii.gz", "pat2_0000.nii.gz"]
    other = [entry["reason"] for entry in report["not_read"] if entry.get("file", "").endswith("pat1_0001.nii.gz")]
    assert len(other) == 1 and "channel 1 of the nnU-Net case pat1" in other[0]


def test_an_unlabelled_nnunet_images_folder_is_grouped_too(tmp_path: Path):
    source = _nnunet(tmp_path / "ds", ["a", "b"], channels=3, labels=False)
    assert _names(source / "imagesTr") == (["a", "b"], ["a_0001.nii.gz", "a_0002.nii.gz", "b_0001.nii.gz",
                                                        "b_0002.nii.gz"])


def test_files_merely_named_like_channels_stay_cases_of_their_own(tmp_path: Path):
    # an export of cases named scan_0000, scan_0001, scan_0002: one "case" of three channels would lose two
    export = _nnunet(tmp_path / "export", ["scan"], channels=3, labels=False)
    assert _names(export)[0] == ["scan_0000", "scan_0001", "scan_0002"]
    # labels named as the files, not as cases: the files are the cases
    named = tmp_path / "named"
    for n, stem in enumerate(["x_0000", "x_0001", "y_0000", "y_0001"]):
        image(named / "imagesTr" / f"{stem}.nii.gz", n)
        label(named / "labelsTr" / f"{stem}.nii.gz", 0)
    assert _names(named)[0] == ["x_0000", "x_0001", "y_0000", "y_0001"]
    # channels that differ between cases are not nnU-Net's
    uneven = tmp_path / "uneven"
    for stem in ["p_0000", "p_0001", "q_0000"]:
        image(uneven / "imagesTr" / f"{stem}.nii.gz", 1)
    assert _names(uneven)[0] == ["p_0000", "p_0001", "q_0000"]


def test_public_label_map_names_are_passed_over_beside_their_images(tmp_path: Path):
    brats = tmp_path / "BraTS2021_00000"
    for n, modality in enumerate(["flair", "t1", "t1ce", "t2"]):
        image(brats / f"BraTS2021_00000_{modality}.nii.gz", n)
    label(brats / "BraTS2021_00000_seg.nii.gz", 0)
    brats23 = tmp_path / "BraTS-GLI-00000-000"
    image(brats23 / "BraTS-GLI-00000-000-t1c.nii.gz", 5)
    label(brats23 / "BraTS-GLI-00000-000-seg.nii.gz", 0)
    image(tmp_path / "kits" / "case_00000" / "imaging.nii.gz", 6)
    label(tmp_path / "kits" / "case_00000" / "segmentation.nii.gz", 0)
    image(tmp_path / "lits" / "volume-0.nii", 7)
    label(tmp_path / "lits" / "segmentation-0.nii", 0)
    names, passed = _names(tmp_path)
    assert names == ["BraTS-GLI-00000-000-t1c", "BraTS2021_00000_flair", "BraTS2021_00000_t1", "BraTS2021_00000_t1ce",
                     "BraTS2021_00000_t2", "imaging", "volume-0"]
    assert passed == ["BraTS-GLI-00000-000-seg.nii.gz", "BraTS2021_00000_seg.nii.gz", "segmentation-0.nii",
                      "segmentation.nii.gz"]
    assert _names(tmp_path, include_label_maps=True)[1] == []  # still imported when asked


def test_images_named_like_label_maps_with_no_image_of_theirs_beside_are_still_images(tmp_path: Path):
    for n, stem in enumerate(["brain_mask", "segmentation", "heart_seg", "lung_t1", "segmentation-3", "volume-4",
                              "case1_label", "case10_t1"]):
        image(tmp_path / f"{stem}.nii.gz", n)
    names, passed = _names(tmp_path)
    assert passed == []
    assert sorted(names) == sorted(["brain_mask", "segmentation", "heart_seg", "lung_t1", "segmentation-3",
                                    "volume-4", "case1_label", "case10_t1"])
    # a label map beside another label map of the same stem only: neither is an image of the other's
    image(tmp_path / "both" / "p_seg.nii.gz", 1)
    image(tmp_path / "both" / "p_mask.nii.gz", 2)
    assert _names(tmp_path / "both") == (["p_mask", "p_seg"], [])


# ---- 7: a CaseStatus goes on the wire by its value --------------------------------------------------------


def test_cases_of_a_status_given_as_a_case_status(server_factory, tmp_path: Path):
    server = server_factory.start(learn_store=tmp_path / "store")
    with SegAssistClient(server.url, TOKENS["alice"]) as alice:
        volume = Volume(np.random.default_rng(0).random(SHAPE).astype(np.float32) * 100)
        case = alice.learning.import_image(volume, name="c0")
        assert [c.id for c in alice.learning.cases(status=CaseStatus.NEW)] == [case.id]
        assert [c.id for c in alice.learning.cases(status=[CaseStatus.NEW, "in_progress"])] == [case.id]
        assert alice.learning.cases(status=CaseStatus.SUBMITTED) == []


# ---- 8, 9: a loopback server answering what a broken or hostile server would ------------------------------

CASE_SHAPE = [10, 6, 6]


def _case() -> Dict[str, Any]:
    return {"id": "0123456789abcdef", "name": "c", "status": "in_progress", "shape": CASE_SHAPE,
            "spacing": [1, 1, 1], "image_sha256": "0" * 64, "content_hash": "0" * 64, "source": "upload",
            "imported_at": 0.0, "imported_by": "alice", "n_labels": 0}  # fmt: skip


def _next_reply(offset: List[int], shape: List[int], mask: Dict[str, Any]) -> bytes:
    proposal = {"offset": offset, "shape": shape, "mask": mask, "agreement": 1.0, "uncertainty": 0.0, "members": 1,
                "engine_version": "x", "prompts": []}  # fmt: skip
    reply = {"case": _case(), "image_id": "0" * 64, "strategy": "first", "score": {}, "proposal": proposal}
    return json.dumps(reply).encode()


class _Answers(QuietHandler):
    """Answers each request with the next body of ``replies`` (the last one again when they run out)."""

    disable_nagle_algorithm = True  # each reply at once: no delayed-ACK wait between polls to measure
    replies: List[bytes] = []
    seen: List[float] = []

    def _answer(self) -> None:
        self.read_body()
        body = self.replies[min(len(self.seen), len(self.replies) - 1)]
        self.seen.append(time.monotonic())
        self.send_json(body)

    do_GET = do_POST = _answer


@pytest.fixture()
def answering() -> Iterator[Tuple[SegAssistClient, type]]:
    handler = type("Handler", (_Answers,), {"replies": [], "seen": []})
    with serving(handler, poll_interval=0.02) as url:
        client = SegAssistClient(url, TOKENS["alice"])
        try:
            yield client, handler
        finally:
            client.close()


def test_a_proposal_box_at_a_negative_offset_is_refused_not_written_at_the_far_end(answering):
    client, handler = answering
    box = ArrayPayload.from_array(np.ones((2, 6, 6), np.uint8), "zlib").model_dump()
    handler.replies = [_next_reply([-3, 0, 0], [2, 6, 6], box)]
    with pytest.raises(ProtocolError, match=r"proposal box \[2, 6, 6\] at \[-3, 0, 0\] does not fit"):
        client.learning.next_case(strategy="first")
    handler.replies, handler.seen = [_next_reply([8, 0, 0], [2, 6, 6], box)], []  # the last slices: it fits
    nxt = client.learning.next_case(strategy="first")
    assert np.unique(np.nonzero(nxt.proposal)[0]).tolist() == [8, 9]


def test_a_proposal_box_is_decompressed_no_further_than_its_declared_shape(answering):
    """A box declared 2x6x6 whose data declares 64 MB (compressed to kilobytes) is refused before it is
    decompressed: no 64 MB buffer is ever made."""
    client, handler = answering
    big = (400, 400, 400)
    data = zlib.compress(bytes(int(np.prod(big))), 9)

    mask = {"dtype": "|u1", "shape": list(big), "codec": "zlib", "nbytes": int(np.prod(big)),
            "payload_nbytes": len(data), "data": base64.b64encode(data).decode()}  # fmt: skip
    handler.replies = [_next_reply([0, 0, 0], [2, 6, 6], mask)]
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=r"proposal box \[2, 6, 6\] holds an array of shape \[400, 400, 400\]"):
            client.learning.next_case(strategy="first")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16_000_000


@pytest.mark.parametrize("poll_s", [-1, 0, 0.0, float("nan"), float("inf"), True, "1"])
def test_wait_for_job_refuses_a_poll_interval_that_is_no_duration_before_polling(answering, poll_s):
    client, handler = answering
    handler.replies = [json.dumps({"job_id": "20250101-000000-abcdef", "state": "done"}).encode()]
    with pytest.raises(ValueError, match="poll_s must be seconds above 0"):
        client.learning.wait_for_job("20250101-000000-abcdef", poll_s=poll_s)
    assert handler.seen == []  # nothing was sent
    with pytest.raises(ValueError, match="timeout must be seconds, 0 or more"):
        client.learning.wait_for_job("20250101-000000-abcdef", timeout=float("nan"))


def test_wait_for_job_polls_no_more_often_than_its_minimum_interval(answering):
    client, handler = answering
    running = json.dumps({"job_id": "20250101-000000-abcdef", "state": "running"}).encode()
    handler.replies = [running] * 5 + [json.dumps({"job_id": "20250101-000000-abcdef", "state": "done"}).encode()]
    assert client.learning.wait_for_job("20250101-000000-abcdef", poll_s=1e-6).state == "done"
    gaps = np.diff(handler.seen)
    assert len(handler.seen) == 6 and gaps.min() >= 0.045
