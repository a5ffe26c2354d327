//! Who may go, how fast, and when: pure bookkeeping with time from an injected clock.
//!
//! Nothing here touches a socket. The bandwidth and request-rate values operators write
//! (`rate`), the per-user token bucket (`bucket`), request-rate throttles (`throttle`), and
//! connection slots with their paused queue (`admission`). The servers in net/, local/ and
//! remote/ ask these modules and act on the answers.

pub mod admission;
pub mod bucket;
pub mod clock;
pub mod rate;
pub mod throttle;
