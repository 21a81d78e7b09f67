use overlay_common::CounterIndex;

use crate::maps::COUNTERS;

#[inline(always)]
pub fn count(index: CounterIndex, bytes: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(index as u32) {
        // SAFETY: per-CPU slot; no other writer on this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
