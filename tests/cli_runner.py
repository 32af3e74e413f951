"""Run the `nexgate` command in-process, as tests of the CLI need it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from nexgate_proxy import cli


class Cli:
    """Runs `nexgate ...` in-process (on a worker thread: the commands call asyncio.run).

    Extra arguments given at construction (e.g. ``--storage-url URL``) go after every command.
    """

    def __init__(self, capsys: pytest.CaptureFixture[str], *common: str) -> None:
        self.capsys = capsys
        self.common = list(common)

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await asyncio.to_thread(cli.main, [*argv, *self.common])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    async def json(self, *argv: str) -> Any:
        code, out, err = await self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)

    async def fails(self, *argv: str) -> str:
        code, out, err = await self(*argv)
        assert code == 1, (argv, out, err)
        assert err.startswith("nexgate: error: ") and len(err.strip().splitlines()) == 1, err
        return err
