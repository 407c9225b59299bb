"""Offline detection: the libraries' own copies of HF_HUB_OFFLINE are set, not only the variable."""

from __future__ import annotations

import socket

import pytest


def test_unresolvable_hub_switches_libraries_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    from llmkit import hub

    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub.hub_offline.cache_clear()
    try:
        assert hub.hub_offline()
        # imported before the check, the libraries keep their own flags: both must flip
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
        assert datasets.config.HF_HUB_OFFLINE is True
    finally:
        hub.hub_offline.cache_clear()


def test_model_folder_errors(tmp_path) -> None:
    from llmkit.errors import LlmkitError
    from llmkit.hub import check_model_source

    with pytest.raises(LlmkitError, match="no config.json"):
        check_model_source(str(tmp_path))
    with pytest.raises(LlmkitError, match="no such checkpoint folder"):
        check_model_source(str(tmp_path / "missing"))
