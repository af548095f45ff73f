//! End-to-end test package; the tests live in e2e/.
