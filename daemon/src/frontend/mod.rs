//! Kernel frontends: each turns the kernel's "this range is about to be read" into a
//! call to the core ("make this range of the store present") and answers the kernel.

pub mod cachefiles;
pub mod fanotify;
