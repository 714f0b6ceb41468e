//! Machine stage: the legal membership state graph, as a statig blocking machine used as a
//! pure step `(state, input) → (state', transition)`. Nothing is performed here: no entry
//! or exit actions exist (a machine restored from storage re-runs its entry actions), and
//! effects are values that `rules` returns and `store` records in the same transaction.
//! An input the graph does not allow from a state is refused, never forced.

pub mod graph;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use statig::blocking::{IntoStateMachineExt, UninitializedStateMachine};
use statig::prelude::*;

/// A membership's state, as stored and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MState {
    None,
    Trialing,
    Active,
    PastDue,
    Canceling,
    Paused,
    Canceled,
    Expired,
    Refunded,
}

impl MState {
    pub const ALL: [MState; 9] = [
        MState::None,
        MState::Trialing,
        MState::Active,
        MState::PastDue,
        MState::Canceling,
        MState::Paused,
        MState::Canceled,
        MState::Expired,
        MState::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MState::None => "none",
            MState::Trialing => "trialing",
            MState::Active => "active",
            MState::PastDue => "past_due",
            MState::Canceling => "canceling",
            MState::Paused => "paused",
            MState::Canceled => "canceled",
            MState::Expired => "expired",
            MState::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Option<MState> {
        MState::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Whether a membership in this state holds access (DESIGN: trialing, active,
    /// past_due, canceling). How long it holds it is the rules' call (grace, period end).
    pub fn holds_access(self) -> bool {
        matches!(self, MState::Trialing | MState::Active | MState::PastDue | MState::Canceling)
    }

    /// Terminal states, from which only a new purchase (or trial) starts again.
    pub fn is_end(self) -> bool {
        matches!(self, MState::Canceled | MState::Expired | MState::Refunded)
    }

    fn to_statig(self) -> State {
        match self {
            MState::None => State::none(),
            MState::Trialing => State::trialing(),
            MState::Active => State::active(),
            MState::PastDue => State::past_due(),
            MState::Canceling => State::canceling(),
            MState::Paused => State::paused(),
            MState::Canceled => State::canceled(),
            MState::Expired => State::expired(),
            MState::Refunded => State::refunded(),
        }
    }

    fn from_statig(s: &State) -> MState {
        match s {
            State::None {} => MState::None,
            State::Trialing {} => MState::Trialing,
            State::Active {} => MState::Active,
            State::PastDue {} => MState::PastDue,
            State::Canceling {} => MState::Canceling,
            State::Paused {} => MState::Paused,
            State::Canceled {} => MState::Canceled,
            State::Expired {} => MState::Expired,
            State::Refunded {} => MState::Refunded,
        }
    }
}

impl std::fmt::Display for MState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the rules ask the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    StartTrial,
    Activate,
    PaymentFailed,
    ScheduleCancel,
    RevertCancel,
    Pause,
    Resume,
    Cancel,
    Expire,
    Refund,
    /// Data-only change (plan, period) that keeps the state.
    Update,
}

impl Input {
    pub const ALL: [Input; 11] = [
        Input::StartTrial,
        Input::Activate,
        Input::PaymentFailed,
        Input::ScheduleCancel,
        Input::RevertCancel,
        Input::Pause,
        Input::Resume,
        Input::Cancel,
        Input::Expire,
        Input::Refund,
        Input::Update,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Input::StartTrial => "start_trial",
            Input::Activate => "activate",
            Input::PaymentFailed => "payment_failed",
            Input::ScheduleCancel => "schedule_cancel",
            Input::RevertCancel => "revert_cancel",
            Input::Pause => "pause",
            Input::Resume => "resume",
            Input::Cancel => "cancel",
            Input::Expire => "expire",
            Input::Refund => "refund",
            Input::Update => "update",
        }
    }

    pub fn parse(s: &str) -> Option<Input> {
        Input::ALL.into_iter().find(|i| i.as_str() == s)
    }
}

/// The result of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The graph allows the input; `from == to` for self-loops (renewal, update).
    Moved { from: MState, to: MState },
    /// The graph has no edge for this input from this state.
    Refused { from: MState, input: Input },
}

/// Collects what happened during one step (statig's external context).
#[derive(Debug, Default)]
pub struct Trace {
    refused: bool,
}

/// The shared storage of the statig machine: empty, so the machine is a pure graph.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Membership;

#[state_machine(
    initial = "State::none()",
    event_identifier = "input",
    state(derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)),
    superstate(derive(Debug))
)]
impl Membership {
    /// No membership yet: a purchase or a trial starts one.
    #[state(superstate = "membership")]
    fn none(input: &Input) -> Outcome<State> {
        match input {
            Input::StartTrial => Transition(State::trialing()),
            Input::Activate => Transition(State::active()),
            _ => Super,
        }
    }

    #[state(superstate = "holding")]
    fn trialing(input: &Input) -> Outcome<State> {
        match input {
            Input::StartTrial => Handled,
            Input::Activate => Transition(State::active()),
            Input::PaymentFailed => Transition(State::past_due()),
            Input::ScheduleCancel => Transition(State::canceling()),
            _ => Super,
        }
    }

    #[state(superstate = "holding")]
    fn active(input: &Input) -> Outcome<State> {
        match input {
            Input::Activate => Handled,
            Input::PaymentFailed => Transition(State::past_due()),
            Input::ScheduleCancel => Transition(State::canceling()),
            _ => Super,
        }
    }

    /// Payment failed: access is kept until the grace period ends.
    #[state(superstate = "holding")]
    fn past_due(input: &Input) -> Outcome<State> {
        match input {
            Input::Activate => Transition(State::active()),
            Input::PaymentFailed => Handled,
            Input::ScheduleCancel => Transition(State::canceling()),
            _ => Super,
        }
    }

    /// Cancel at period end: access is kept until then.
    #[state(superstate = "holding")]
    fn canceling(input: &Input) -> Outcome<State> {
        match input {
            Input::RevertCancel => Transition(State::active()),
            Input::ScheduleCancel => Handled,
            _ => Super,
        }
    }

    /// States that hold access.
    #[superstate(superstate = "membership")]
    fn holding(input: &Input) -> Outcome<State> {
        match input {
            Input::Pause => Transition(State::paused()),
            Input::Cancel => Transition(State::canceled()),
            Input::Expire => Transition(State::expired()),
            Input::Refund => Transition(State::refunded()),
            Input::Update => Handled,
            _ => Super,
        }
    }

    #[state(superstate = "membership")]
    fn paused(input: &Input) -> Outcome<State> {
        match input {
            Input::Resume => Transition(State::active()),
            Input::Pause | Input::Update => Handled,
            Input::Cancel => Transition(State::canceled()),
            Input::Expire => Transition(State::expired()),
            Input::Refund => Transition(State::refunded()),
            _ => Super,
        }
    }

    #[state(superstate = "ended")]
    fn canceled(input: &Input) -> Outcome<State> {
        let _ = input;
        Super
    }

    #[state(superstate = "ended")]
    fn expired(input: &Input) -> Outcome<State> {
        let _ = input;
        Super
    }

    #[state(superstate = "ended")]
    fn refunded(input: &Input) -> Outcome<State> {
        let _ = input;
        Super
    }

    /// Ends: a new purchase starts a new term; a refund may follow a cancellation.
    #[superstate(superstate = "membership")]
    fn ended(input: &Input) -> Outcome<State> {
        match input {
            Input::Activate => Transition(State::active()),
            Input::StartTrial => Transition(State::trialing()),
            Input::Refund => Transition(State::refunded()),
            Input::Update => Handled,
            _ => Super,
        }
    }

    /// The top: whatever reaches it has no edge, and is refused.
    #[superstate]
    fn membership(input: &Input, context: &mut Trace) -> Outcome<State> {
        let _ = input;
        context.refused = true;
        Handled
    }
}

/// One step of the formal graph: a lookup in the table `statig_step` fills once, so the
/// statig machine stays the one definition of the graph and the hot path does no serde.
pub fn step(from: MState, input: Input) -> Step {
    static TABLE: std::sync::OnceLock<Vec<Step>> = std::sync::OnceLock::new();
    let table = TABLE
        .get_or_init(|| MState::ALL.iter().flat_map(|&s| Input::ALL.iter().map(move |&i| statig_step(s, i))).collect());
    table[from as usize * Input::ALL.len() + input as usize]
}

/// One step of the statig machine itself, restored in `from`.
fn statig_step(from: MState, input: Input) -> Step {
    let mut sm = restore(from);
    let mut trace = Trace::default();
    sm.handle_with_context(&input, &mut trace);
    if trace.refused {
        Step::Refused { from, input }
    } else {
        Step::Moved { from, to: MState::from_statig(sm.state()) }
    }
}

/// Rebuilds a machine in a stored state through statig's own serde support.
fn restore(from: MState) -> statig::blocking::StateMachine<Membership> {
    let mut v = serde_json::to_value(Membership.uninitialized_state_machine()).expect("machine serializes");
    v["state"] = serde_json::to_value(from.to_statig()).expect("state serializes");
    let sm: UninitializedStateMachine<Membership> = serde_json::from_value(v).expect("machine deserializes");
    sm.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purchase_from_none_activates() {
        assert_eq!(step(MState::None, Input::Activate), Step::Moved { from: MState::None, to: MState::Active });
    }

    #[test]
    fn payment_failed_from_none_is_refused() {
        assert_eq!(
            step(MState::None, Input::PaymentFailed),
            Step::Refused { from: MState::None, input: Input::PaymentFailed }
        );
    }

    #[test]
    fn step_table_matches_the_statig_machine_for_every_pair() {
        for (n, s) in MState::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, n);
            for (m, i) in Input::ALL.into_iter().enumerate() {
                assert_eq!(i as usize, m);
                assert_eq!(step(s, i), statig_step(s, i), "{s} {}", i.as_str());
            }
        }
    }

    #[test]
    fn every_state_restores_to_itself() {
        for s in MState::ALL {
            assert_eq!(MState::from_statig(restore(s).state()), s);
        }
    }

    #[test]
    fn ends_restart_on_purchase_and_refuse_pause() {
        for s in [MState::Canceled, MState::Expired, MState::Refunded] {
            assert_eq!(step(s, Input::Activate), Step::Moved { from: s, to: MState::Active });
            assert!(matches!(step(s, Input::Pause), Step::Refused { .. }));
        }
    }

    #[test]
    fn cancel_scheduled_then_reverted_returns_to_active() {
        let Step::Moved { to, .. } = step(MState::Active, Input::ScheduleCancel) else { panic!() };
        assert_eq!(to, MState::Canceling);
        assert_eq!(step(to, Input::RevertCancel), Step::Moved { from: to, to: MState::Active });
    }
}
