//! Reference model of the policy (owned by the model helper).
