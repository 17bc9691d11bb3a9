pub mod registry; pub mod fixtures;
