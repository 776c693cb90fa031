//! Typed specs for the three nstream model kinds.
