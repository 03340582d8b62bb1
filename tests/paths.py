"""Where the tests find the checkout and their data, declared once for every test folder."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout
TEST_DATA = ROOT / "tests" / "data"  # the tests' own small fixtures
