#!/usr/bin/env bash
# Stops every daemon start.sh started (by PID) under $E2E_DIR.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
e2e_stop_all
