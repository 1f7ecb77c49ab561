"""The send stage sends a large PAGES record straight out of its ring slot (issue 13: a
page is copied once on each host outside the kernel): the record's header and arrays
are laid in the slot's wire prefix, in front of the data the digest worker wrote, and
ZeroMQ sends that memory; the slot goes back to the digest worker once ZeroMQ is done
with it. A full sync of random pages (raw, 4 MiB records) goes that way, over CURVE and
in plaintext, and the secondary's memory is then the primary's."""
from __future__ import annotations

import pytest

from pipeline.config import PipelineSettings
from pipeline.localpair import LocalPair

pytestmark = pytest.mark.slow  # starts real node processes


@pytest.mark.parametrize("security", ["curve", "plaintext"])
def test_full_sync_records_go_from_the_ring_slots(tmp_path, security):
    with LocalPair({
        "guest": {"backend": "sim", "page_count": 8192},
        "pipeline": {"compress": "none"},
        "security": {"mode": security},
    }, workdir=str(tmp_path)) as pair:
        pair.start()
        pair.wait_protected(timeout=300)
        # 8192 random pages: the sync's batches are 1024 raw pages (pipeline.batch_pages),
        # 4 MiB of data each
        batch = PipelineSettings().batch_pages
        assert pair.stage_counter("send", "records_in_place") >= 8192 // batch // 2
        info = pair.prove_memory_equal()
        assert info["memory_equal"], info
