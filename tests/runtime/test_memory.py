import mmap
import time

import numpy as np

from saap.runtime.memory import PhasePeakRss, peak_rss_mb


def test_phase_peak_sees_memory_that_is_freed_before_the_phase_ends():
    with PhasePeakRss(interval=0.005) as outside:
        pass
    with PhasePeakRss(interval=0.005) as phase:
        # 200 MB of fresh pages, touched: malloc could hand back pages an earlier test left resident
        # (after torch has run here, a 200 MB np.ones did not raise RSS on an Intel VM)
        block = mmap.mmap(-1, 200 * 2**20)
        pages = np.frombuffer(block, dtype=np.uint8)
        pages[:] = 1
        time.sleep(0.1)
        del pages
        block.close()
    assert phase.peak_mb is not None and outside.peak_mb is not None
    assert phase.peak_mb - outside.peak_mb > 150
    assert peak_rss_mb() >= phase.peak_mb - 1
