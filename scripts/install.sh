#!/usr/bin/env sh
# Installs what sparsecc's tests need, at the versions CI tested (constraints.txt): the
# package with its test extra, and Debian's headless Chromium for the report-page test.
# README's set-up command and .ci/run both call this script. Run it in a virtual environment.
set -eu
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if command -v apt-get >/dev/null; then
        sudo=$(test "$(id -u)" = 0 || echo sudo)
        $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium chromium-driver >/dev/null
    else
        echo "install.sh: no apt-get here; install Chromium and ChromeDriver yourself (tests/test_report_page.py needs them)" >&2
    fi
fi
python -m pip install -q -c constraints.txt -e ".[test]"
