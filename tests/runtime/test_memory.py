import time

import numpy as np

from runtime.memory import PhasePeakRss, peak_rss_mb


def test_phase_peak_sees_memory_that_is_freed_before_the_phase_ends():
    with PhasePeakRss(interval=0.005) as outside:
        pass
    with PhasePeakRss(interval=0.005) as phase:
        block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
        time.sleep(0.1)
        del block
    assert phase.peak_mb is not None and outside.peak_mb is not None
    assert phase.peak_mb - outside.peak_mb > 150
    assert peak_rss_mb() >= phase.peak_mb - 1
