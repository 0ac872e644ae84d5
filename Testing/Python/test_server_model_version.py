"""Which model version a session credits: the one that made the mask it shows.

A real server on loopback with a datastore; a version is promoted through the registry (as a
training job does) while a session is open. Undo, redo and reset run no model: they bring back the
mask of an earlier step, and with it the version that made that mask, in the replies, the session's
state, its prompt log and a label saved from it.
"""

from __future__ import annotations

from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.client import SegAssistClient
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]


def _promote_a_version(store, checkpoint) -> None:
    """Record a version and make it current, as a finished training job does (the base weights
    as a full fine-tune: what matters here is the swap, not the weights)."""
    from SegAssistLib.engine.network import load_checkpoint
    from SegAssistLib.learning.deploy import save_full_version
    from SegAssistLib.learning.registry import AdapterRegistry

    base = load_checkpoint(checkpoint)
    fields = {"base_identity": base.identity, "val_dice": 0.5, "incumbent": None, "incumbent_dice": 0.4}
    registry = AdapterRegistry(store)
    registry.add_version(
        "full",
        lambda path, _: save_full_version(path, base.network, base.config, base.identity, {}),
        fields,
        promote=True,
        expected_current=None,
    )
    assert registry.read().current == "v1"


def test_undo_redo_and_reset_credit_the_version_that_made_the_mask(server_factory, tmp_path):
    store = tmp_path / "store"
    server = server_factory.start(learn_store=store)
    volume = make_volume(seed=41)
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 120.0)) as alice:
        case = alice.learning.import_image(volume, name="swapped while annotated")
        alice.learning.lock(case.id)
        base = alice.info().model.version
        adapted = f"{base}+v1"
        with alice.open_session(volume) as session:
            assert session.status().model_version is None  # no model has made a mask yet
            first = session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
            second = session.add_prompt(PointPrompt(position=(20.0, 18.0, 12.0)))
            assert first.info["model_version"] == second.info["model_version"] == base

            _promote_a_version(store, server_factory.checkpoint)
            undone = session.undo()  # the mask of the first prompt: base made it
            assert undone.info["model_version"] == base
            assert session.status().model_version == base
            assert session.prompt_log().model.endswith("@" + base)
            draft = alice.learning.submit(case.id, session, submit=False)
            assert (draft.model, draft.adapter_version) == (base, None)
            assert session.redo().info["model_version"] == base  # the second prompt's mask: base too

            third = session.add_prompt(PointPrompt(position=(26.0, 22.0, 12.0)))
            assert third.info["model_version"] == adapted  # the promoted version answers the next prompt
            assert session.prompt_log().model.endswith("@" + adapted)
            label = alice.learning.submit(case.id, session, submit=False)
            assert (label.model, label.adapter_version) == (adapted, "v1")
            assert session.undo().info["model_version"] == base
            assert session.redo().info["model_version"] == adapted

            cleared = session.reset()  # an empty mask no model made
            assert cleared.info["model_version"] is None and session.status().model_version is None
            assert session.prompt_log().model is None
            assert session.undo().info["model_version"] == adapted  # the reset undone: v1's mask again
            assert session.status().model_version == adapted


def test_a_replayed_session_credits_the_version_answering_its_replay(server_factory, tmp_path):
    store = tmp_path / "store"
    server = server_factory.start(learn_store=store)
    volume = make_volume(seed=42)
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 120.0)) as alice:
        adapted = alice.info().model.version + "+v1"
        _promote_a_version(store, server_factory.checkpoint)
        prompts = [PointPrompt(position=(24.0, 20.0, 12.0))]
        with alice.open_session(volume, prompts) as session:  # the open's job swaps the version in
            assert session.status().model_version == adapted
            assert session.prompt_log().model.endswith("@" + adapted)
            assert session.undo().info["model_version"] is None  # back to the empty mask


def test_a_label_from_an_uncorrected_proposal_credits_the_version_that_proposed_it(server_factory, tmp_path):
    """``/next``'s proposal travels as a mask naming its maker (``made_by``): a label saved from it as it
    is names the version (and adapter) that proposed it, not no model; undoing the mask credits none."""
    from SegAssistLib.prompts import MaskPrompt

    server = server_factory.start(learn_store=tmp_path / "store")
    volume = make_volume(seed=44)
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 120.0)) as alice:
        case = alice.learning.import_image(volume, name="accepted as proposed")
        alice.learning.lock(case.id)
        proposer = alice.info().model.version + "+v7"  # the version before a promotion, say
        proposal = MaskPrompt.from_array(volume.array > volume.array.mean(), made_by=proposer)
        with alice.open_session(volume, [proposal]) as session:
            assert session.status().model_version == proposer
            assert session.prompt_log().prompts[0].made_by == proposer
            label = alice.learning.submit(case.id, session, submit=False)
            assert (label.model, label.adapter_version) == (proposer, "v7")
            assert session.undo().info["model_version"] is None  # the empty mask before it


def test_an_initial_mask_and_a_first_negative_click_are_credited_to_no_model(server_factory, tmp_path):
    """A session opened from a mask the caller sent (``/next``'s proposal, a segment) was credited to the
    version answering when it opened, and a label saved from it named that version, which made none of
    it (the proposal came from the version before a promotion); a first negative click, for which the
    model does not run, was credited the same way."""
    from SegAssistLib.prompts import MaskPrompt

    store = tmp_path / "store"
    server = server_factory.start(learn_store=store)
    volume = make_volume(seed=43)
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 120.0)) as alice:
        case = alice.learning.import_image(volume, name="from a proposal")
        alice.learning.lock(case.id)
        base = alice.info().model.version
        proposal = volume.array > volume.array.mean()
        with alice.open_session(volume, [MaskPrompt.from_array(proposal)]) as session:
            assert session.status().model_version is None
            assert session.prompt_log().model is None
            label = alice.learning.submit(case.id, session, submit=False)
            assert (label.model, label.adapter_version) == (None, None)
            corrected = session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
            assert corrected.info["model_version"] == base  # the model answered the correction
        with alice.open_session(volume) as session:
            background = session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0), positive=False))
            assert background.info["model_version"] is None and session.status().model_version is None
