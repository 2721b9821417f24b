//! The cases, one function each, grouped by topic. The list that expands them into tests is
//! [`conformance_suite!`](crate::conformance_suite).

mod cache;
mod children;
mod faults;
mod limits;
mod nodes;
mod observability;
mod recipes;
mod registration;
mod sessions;
mod watch;

pub use cache::*;
pub use children::*;
pub use faults::*;
pub use limits::*;
pub use nodes::*;
pub use observability::*;
pub use recipes::*;
pub use registration::*;
pub use sessions::*;
pub use watch::*;
