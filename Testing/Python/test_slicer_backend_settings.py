"""The module's backend settings as the user sees them: remote settings the client would refuse are
refused by ``validate()`` naming what to change in the panel; the panel never shows another
backend's model and licence; a token an earlier version kept in Slicer's settings survives a token
file that cannot take it. Real token files, real settings stores (QSettings-like), a real session
of the effect (``InteractiveSession`` on the manager's client)."""

from __future__ import annotations

import numpy as np
import pytest

from SegAssistLib.image import Volume
from SegAssistLib.prompts import PointPrompt
from SegAssistLib.slicer.backend import (
    REMOTE,
    SETTINGS_PREFIX,
    BackendConfigError,
    BackendManager,
    BackendSettings,
    BackendStatus,
)
from SegAssistLib.slicer.session_state import InteractiveSession, Op, PromptState, describe_error
from SegAssistLib.slicer.tokens import TokenFile


def _remote(url: str, token: str = "", **more) -> BackendSettings:
    return BackendSettings(mode=REMOTE, remote_url=url, remote_token=token, remote_opt_in=True, **more)


@pytest.mark.parametrize("url", ["http://192.168.1.20:8470", "http://seg.example.org"])
def test_a_token_over_plain_http_is_refused_naming_the_checkbox(url):
    """The effect said "Unexpected error (ValueError): refusing to send a token in clear text ...
    (or pass allow_insecure_token=True ...)": Python-API advice; the panel's checkbox went unnamed."""
    settings = _remote(url, "abc123")
    with pytest.raises(BackendConfigError, match="'Allow the token over plain http'") as caught:
        settings.validate()
    assert "allow_insecure_token" not in str(caught.value)
    state = PromptState()
    session = InteractiveSession(BackendManager(settings).client, Volume(np.zeros((4, 4, 4), np.float32)), None)
    request = state.request(Op.PROMPT, PointPrompt(position=(1.0, 1.0, 1.0)))
    try:
        session.run(request)
    except BaseException as exc:  # noqa: BLE001 - what the effect's worker hands to _poll
        state.accept(request, None, exc)
    line = describe_error(state.last_error)
    assert not line.startswith("Unexpected error") and "'Allow the token over plain http'" in line

    settings.with_changes(allow_insecure_http=True).validate()  # ticked: a network the user trusts
    _remote(url).validate()  # no token: nothing secret crosses the network
    _remote("http://127.0.0.1:8470", "abc123").validate()  # this computer
    _remote("http://localhost:8470", "abc123").validate()
    _remote("https://" + url.split("://")[1], "abc123").validate()


@pytest.mark.parametrize("url", ["https://", "https://host:84a0", "https://my server:8470", "http://host:99999"])
def test_a_url_without_a_host_or_with_a_bad_port_is_refused_by_validate(url):
    """These passed validate(); "https://" then failed as "Unexpected error (ValueError)", the others
    made a client that could never connect."""
    with pytest.raises(BackendConfigError, match="is not https://host:port") as caught:
        _remote(url).validate()
    assert describe_error(caught.value) == str(caught.value)  # the status line: the message itself
    _remote("https://seg.example.org:8470/segassist").validate()  # a server behind a path is fine
    _remote("https://[::1]:8470").validate()


def test_what_the_client_still_refuses_is_a_configuration_error_not_an_unexpected_one():
    """A token with a space passes validate() (it is the server's to judge), but the client refuses
    to send it: said as a settings problem."""
    manager = BackendManager(_remote("https://seg.example.org", "two words"))
    with pytest.raises(BackendConfigError, match="remote backend settings: the token holds spaces") as caught:
        manager.client()
    assert not describe_error(caught.value).startswith("Unexpected error")


def test_the_panel_clears_the_model_and_licence_of_a_backend_that_names_none():
    """After a Test connection on a remote server, switching to a running local backend kept showing
    the remote model and its licence ("BigRemoteNet 2.1 / proprietary") beside "local backend: running"."""
    from SegAssistLib.slicer.backend import model_labels  # what the panel's _showBackendStatus shows

    remote = BackendStatus(REMOTE, True, "https://gpu:8470", "BigRemoteNet", "2.1", "proprietary", "cuda:0")
    assert model_labels(remote) == ("BigRemoteNet 2.1", "proprietary")
    running_local = BackendStatus("local", True, "http://127.0.0.1:40000", message="running (started here)")
    assert model_labels(running_local) is None  # connected, but no model named: cleared
    assert model_labels(BackendStatus("local", False, message="stopped")) is None
    assert model_labels(None) is None
    assert model_labels(BackendStatus(REMOTE, True, "https://gpu:8470", "Net", "", "", "cpu")) == ("Net", "-")


class QSettingsLike:
    """A store that does not keep secrets, as qt.QSettings."""

    def __init__(self, values=None) -> None:
        self.values = dict(values or {})

    def value(self, key, defaultValue=None):
        return self.values.get(key, defaultValue)

    def setValue(self, key, value) -> None:
        self.values[key] = value


def _legacy_store(url: str = "https://gpu:8470") -> QSettingsLike:
    """Settings an earlier version saved: the token in Slicer's settings."""
    return QSettingsLike(
        {
            SETTINGS_PREFIX + "mode": REMOTE,
            SETTINGS_PREFIX + "remote_url": url,
            SETTINGS_PREFIX + "remote_token": "LEGACY-TOKEN",
            SETTINGS_PREFIX + "remote_opt_in": "true",
        }
    )


def test_a_legacy_token_stays_in_the_settings_until_the_token_file_takes_it(tmp_path):
    """With a damaged token file, any panel edit blanked the legacy token in Slicer's settings and then
    failed to write the file: after a restart the token was gone everywhere. The read also said the
    token "was not loaded" while the legacy one was loaded and used."""
    tokens = TokenFile(tmp_path / "remote_tokens.json")
    tokens.path.write_text("{damaged")
    store = _legacy_store()
    loaded = BackendSettings.read(store, tokens)
    assert loaded.settings.remote_token == "LEGACY-TOKEN"
    assert "not loaded" not in loaded.problem and "used from Slicer's settings" in loaded.problem
    problem = loaded.settings.with_changes(local_threads=4).save(store, tokens)  # the user edits CPU threads
    assert "token file" in problem
    assert store.values[SETTINGS_PREFIX + "remote_token"] == "LEGACY-TOKEN"  # kept: the file did not take it
    assert BackendSettings.read(store, tokens).settings.remote_token == "LEGACY-TOKEN"  # after a restart
    assert tokens.path.read_text() == "{damaged"  # left for the user to delete

    tokens.path.unlink()  # the file works again: the token moves there, and leaves Slicer's settings
    assert loaded.settings.save(store, tokens) == ""
    assert store.values[SETTINGS_PREFIX + "remote_token"] == ""
    assert BackendSettings.read(store, tokens).settings.remote_token == "LEGACY-TOKEN"


def test_a_legacy_token_never_stays_for_another_server_or_a_new_token(tmp_path):
    """Kept only while it is the token in use for its own server: a new address (whose token the form
    cleared) or a token typed in must not leave the old one in the settings to be read back for it."""
    tokens = TokenFile(tmp_path / "remote_tokens.json")
    tokens.path.write_text("{damaged")
    for change in ({"remote_url": "https://other:8470", "remote_token": ""}, {"remote_token": "NEW"}):
        store = _legacy_store()
        settings = BackendSettings.read(store, tokens).settings.with_changes(**change)
        assert "not saved" in settings.save(store, tokens)
        assert store.values[SETTINGS_PREFIX + "remote_token"] == ""
        assert BackendSettings.read(store, tokens).settings.remote_token == ""
