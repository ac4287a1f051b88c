//! Nothing accepted is lost, no storm rings twice (filled in below).
