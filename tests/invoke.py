"""Invoking the moec CLI in-process from tests."""
from click.testing import CliRunner

from moec.driver.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(r) -> str:
    """The error line of a run that failed as a user's mistake should: exit 2, one line."""
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]
