//! Who may go, where, how fast, and when: pure bookkeeping with time from an injected clock.
//!
//! Nothing here touches a socket. The bandwidth and request-rate values operators write
//! (`rate`), the per-user token bucket (`bucket`), request-rate throttles (`throttle`),
//! connection slots with their paused queue (`admission`), and the addresses a tunnel may
//! reach (`destinations`). The servers in net/, local/ and
//! remote/ ask these modules and act on the answers.

pub mod admission;
pub mod bucket;
pub mod calendar;
pub mod clock;
pub mod destinations;
pub mod meter;
pub mod quota;
pub mod rate;
pub mod throttle;
