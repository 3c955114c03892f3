use thiserror::Error;

/// Why a JSON document is not an Infobip e-mail callback.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PayloadError {
    #[error("the payload must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error(
        "not an Infobip callback: expected `results` (delivery reports), `notificationType` \
         (tracking event) or `messageId` with `status` (a single delivery report)"
    )]
    NotACallback,
    #[error("`results` must be a list, got {0}")]
    ResultsNotAList(&'static str),
    #[error("`results` is empty: a delivery report carries 1 to 2000 results")]
    NoResults,
    #[error("`results` has {0} entries: Infobip sends at most 2000 per callback")]
    TooManyResults(usize),
    #[error("results[{0}]: {1}")]
    InResult(usize, Box<PayloadError>),
    #[error("a result must be a JSON object, got {0}")]
    ResultNotAnObject(&'static str),
    #[error("a delivery report needs `messageId` and `status`, it has neither")]
    NeitherMessageIdNorStatus,
    #[error("`messageId` is missing")]
    MissingMessageId,
    #[error("`messageId` must be a non-empty string or a number")]
    BadMessageId,
    #[error("`status` must be an object with a non-empty `groupName` (or a status string)")]
    BadStatus,
    #[error("`notificationType` must be a non-empty string")]
    BadNotificationType,
}
