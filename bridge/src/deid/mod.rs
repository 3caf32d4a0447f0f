//! De-identification: the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile
//! applied to an [`InMemDicomObject`] before anything is written to disk, with keyed-hash
//! pseudonyms so that the same patient and the same UID always map to the same pseudonym.
//!
//! The attribute actions follow PS3.15 (DICOM 2024b) Table E.1-1, "Application Level
//! Confidentiality Profile Attributes", for the attributes that occur in CT, MR and SEG objects and
//! their study/series/equipment/request modules. The table is data ([`PROFILE`]); compound actions
//! of the standard (`X/Z`, `X/D`, `Z/D`, `X/Z/D`, `X/Z/U*`) are resolved to the one that keeps the
//! object valid: `Z` for what may be type 2, `D` for what may be type 1, `U` (recursing into
//! sequences) for references. On top of the table:
//!
//! - every UID value that is not a DICOM-defined one (`1.2.840.10008.*`: SOP classes, transfer
//!   syntaxes, coding schemes) is replaced by `2.25.<decimal of 128 bits of HMAC-SHA256>` of the
//!   original, so instances of a series still group and references (ReferencedSOPInstanceUID,
//!   FrameOfReferenceUID, the SEG's ReferencedSeriesSequence) stay consistent;
//! - PatientID and PatientName become the same keyed-hash pseudonym of the original PatientID;
//! - every date (VR DA and DT) follows the [`DatePolicy`]; a per-patient shift keeps intervals;
//! - all private tags are removed unless listed in [`Deidentifier::with_safe_private`];
//! - curves (group 50xx) and overlays (group 60xx, which may hold burned-in text) are removed;
//! - public attributes with an unknown VR (UN, not in the dictionary) are removed, since their
//!   meaning is unknown;
//! - an instance with BurnedInAnnotation = YES, or without BurnedInAnnotation when its SOP class
//!   may carry burned-in text (anything but CT/MR/PET/SEG), is refused with the reason.
//!
//! The reverse mapping (pseudonym → original) is recorded in a [`MappingStore`] inside the hospital
//! (a file in the bridge's state directory, fsynced before an instance is acknowledged), for the
//! write-back path; it is never part of anything the federation sends.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use dicom::core::header::Header;
use dicom::core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom::core::{DataElement, Tag, VR};
use dicom::object::mem::InMemElement;
use dicom::object::InMemDicomObject;
use sha2::{Digest, Sha256};

/// The smallest per-site secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// Errors while de-identifying or recording the pseudonym mapping.
#[derive(Debug, thiserror::Error)]
pub enum DeidError {
    /// The instance has pixel data that may show identifying text; it is refused, not cleaned.
    /// The message names no UID: it goes to the log.
    #[error("instance refused: {reason}")]
    BurnedIn { reason: String },
    #[error("the de-identification secret is {len} bytes; at least {MIN_SECRET_LEN} are needed")]
    SecretTooShort { len: usize },
    #[error(
        "cannot read the de-identification key file {path} (create one with `cosilo bridge init`)"
    )]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file holding the key or re-identification data is readable by group or others.
    #[error("{path} is readable by others (mode {mode:o}); it holds re-identification secrets: chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("cannot open the pseudonym mapping {path}")]
    OpenMapping {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pseudonym mapping {path} is damaged at line {line}: {reason}")]
    CorruptMapping {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("cannot record pseudonyms in {path}")]
    WriteMapping {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What happens to dates (VR DA and DT) and, with [`DatePolicy::Remove`], times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DatePolicy {
    /// The profile's own actions: dates and times emptied or removed.
    Remove,
    /// Every date moved back by the same number of days (1..=max_days) for one patient, derived
    /// from the keyed hash of the patient: intervals within a patient are kept. Times are kept.
    ShiftPerPatient { max_days: u32 },
    /// Dates become January 1st of their year. Times are kept.
    KeepYear,
}

/// What happens to PatientBirthDate (0010,0030).
///
/// PS3.15 Table E.1-1 gives PatientBirthDate the action `Z` in the Basic Profile, and none of the
/// options (Retain Longitudinal Temporal Information with Full or Modified Dates, Retain Patient
/// Characteristics) retains it: a shifted birth date still gives the exact age at every study.
/// [`BirthDatePolicy::Empty`] (the default) follows the standard whatever the [`DatePolicy`];
/// [`BirthDatePolicy::FollowDatePolicy`] treats it like every other date (shifted with the
/// patient's shift, or reduced to the year): a site decision beyond the standard's profile,
/// for studies that need the age.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BirthDatePolicy {
    /// Emptied (PS3.15 Basic Profile and all its options).
    #[default]
    Empty,
    /// Like the other dates (beyond PS3.15: keeps the age at the study).
    FollowDatePolicy,
}

/// A profile action (PS3.15 Table E.1-1 codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace with a non-zero-length dummy value.
    D,
    /// Replace with a zero-length value.
    Z,
    /// Remove.
    X,
    /// Keep (sequences are still processed item by item).
    K,
    /// Clean: here, like `D` (free text is not parsed for identifiers).
    C,
    /// Replace UIDs consistently (sequences: process their items).
    U,
}

/// PS3.15 (2024b) Table E.1-1, restricted to the attributes that occur in CT, MR and SEG objects
/// and their patient/study/series/equipment/request modules, with compound actions resolved (see
/// the module doc). Dates, times and UIDs listed here are further governed by the date policy and
/// the UID rule; private tags, curves and overlays are handled by rule, not listed.
pub const PROFILE: &[(u16, u16, &str, Action)] = &[
    (0x0008, 0x0014, "InstanceCreatorUID", Action::U),
    (0x0008, 0x0015, "InstanceCoercionDateTime", Action::X),
    (0x0008, 0x0018, "SOPInstanceUID", Action::U),
    (0x0008, 0x0020, "StudyDate", Action::Z),
    (0x0008, 0x0021, "SeriesDate", Action::X),
    (0x0008, 0x0022, "AcquisitionDate", Action::Z),
    (0x0008, 0x0023, "ContentDate", Action::D),
    (0x0008, 0x0024, "OverlayDate", Action::X),
    (0x0008, 0x0025, "CurveDate", Action::X),
    (0x0008, 0x002A, "AcquisitionDateTime", Action::Z),
    (0x0008, 0x0030, "StudyTime", Action::Z),
    (0x0008, 0x0031, "SeriesTime", Action::X),
    (0x0008, 0x0032, "AcquisitionTime", Action::Z),
    (0x0008, 0x0033, "ContentTime", Action::D),
    (0x0008, 0x0034, "OverlayTime", Action::X),
    (0x0008, 0x0035, "CurveTime", Action::X),
    (0x0008, 0x0050, "AccessionNumber", Action::Z),
    (0x0008, 0x0051, "IssuerOfAccessionNumberSequence", Action::X),
    (0x0008, 0x0058, "FailedSOPInstanceUIDList", Action::U),
    (0x0008, 0x0080, "InstitutionName", Action::X),
    (0x0008, 0x0081, "InstitutionAddress", Action::X),
    (0x0008, 0x0082, "InstitutionCodeSequence", Action::X),
    (0x0008, 0x0090, "ReferringPhysicianName", Action::Z),
    (0x0008, 0x0092, "ReferringPhysicianAddress", Action::X),
    (
        0x0008,
        0x0094,
        "ReferringPhysicianTelephoneNumbers",
        Action::X,
    ),
    (
        0x0008,
        0x0096,
        "ReferringPhysicianIdentificationSequence",
        Action::X,
    ),
    (0x0008, 0x009C, "ConsultingPhysicianName", Action::Z),
    (
        0x0008,
        0x009D,
        "ConsultingPhysicianIdentificationSequence",
        Action::X,
    ),
    (0x0008, 0x0201, "TimezoneOffsetFromUTC", Action::X),
    (0x0008, 0x1010, "StationName", Action::X),
    (0x0008, 0x1030, "StudyDescription", Action::X),
    (0x0008, 0x103E, "SeriesDescription", Action::X),
    (0x0008, 0x1040, "InstitutionalDepartmentName", Action::X),
    (
        0x0008,
        0x1041,
        "InstitutionalDepartmentTypeCodeSequence",
        Action::X,
    ),
    (0x0008, 0x1048, "PhysiciansOfRecord", Action::X),
    (
        0x0008,
        0x1049,
        "PhysiciansOfRecordIdentificationSequence",
        Action::X,
    ),
    (0x0008, 0x1050, "PerformingPhysicianName", Action::X),
    (
        0x0008,
        0x1052,
        "PerformingPhysicianIdentificationSequence",
        Action::X,
    ),
    (0x0008, 0x1060, "NameOfPhysiciansReadingStudy", Action::X),
    (
        0x0008,
        0x1062,
        "PhysiciansReadingStudyIdentificationSequence",
        Action::X,
    ),
    (0x0008, 0x1070, "OperatorsName", Action::Z),
    (0x0008, 0x1072, "OperatorIdentificationSequence", Action::X),
    (0x0008, 0x1080, "AdmittingDiagnosesDescription", Action::X),
    (0x0008, 0x1084, "AdmittingDiagnosesCodeSequence", Action::X),
    (0x0008, 0x1110, "ReferencedStudySequence", Action::Z),
    (
        0x0008,
        0x1111,
        "ReferencedPerformedProcedureStepSequence",
        Action::Z,
    ),
    (0x0008, 0x1120, "ReferencedPatientSequence", Action::X),
    (0x0008, 0x1140, "ReferencedImageSequence", Action::U),
    (0x0008, 0x1155, "ReferencedSOPInstanceUID", Action::U),
    (0x0008, 0x1195, "TransactionUID", Action::U),
    (0x0008, 0x2111, "DerivationDescription", Action::X),
    (0x0008, 0x2112, "SourceImageSequence", Action::U),
    (0x0008, 0x3010, "IrradiationEventUID", Action::U),
    (0x0008, 0x4000, "IdentifyingComments", Action::X),
    (0x0010, 0x0010, "PatientName", Action::Z),
    (0x0010, 0x0020, "PatientID", Action::Z),
    (0x0010, 0x0021, "IssuerOfPatientID", Action::X),
    (0x0010, 0x0022, "TypeOfPatientID", Action::X),
    (
        0x0010,
        0x0024,
        "IssuerOfPatientIDQualifiersSequence",
        Action::X,
    ),
    (
        0x0010,
        0x0026,
        "SourcePatientGroupIdentificationSequence",
        Action::X,
    ),
    (
        0x0010,
        0x0027,
        "GroupOfPatientsIdentificationSequence",
        Action::X,
    ),
    (0x0010, 0x0030, "PatientBirthDate", Action::Z),
    (0x0010, 0x0032, "PatientBirthTime", Action::X),
    (
        0x0010,
        0x0033,
        "PatientBirthDateInAlternativeCalendar",
        Action::X,
    ),
    (
        0x0010,
        0x0034,
        "PatientDeathDateInAlternativeCalendar",
        Action::X,
    ),
    (0x0010, 0x0035, "PatientAlternativeCalendar", Action::X),
    (0x0010, 0x0040, "PatientSex", Action::Z),
    (
        0x0010,
        0x0050,
        "PatientInsurancePlanCodeSequence",
        Action::X,
    ),
    (
        0x0010,
        0x0101,
        "PatientPrimaryLanguageCodeSequence",
        Action::X,
    ),
    (
        0x0010,
        0x0102,
        "PatientPrimaryLanguageModifierCodeSequence",
        Action::X,
    ),
    (0x0010, 0x1000, "OtherPatientIDs", Action::X),
    (0x0010, 0x1001, "OtherPatientNames", Action::X),
    (0x0010, 0x1002, "OtherPatientIDsSequence", Action::X),
    (0x0010, 0x1005, "PatientBirthName", Action::X),
    (0x0010, 0x1010, "PatientAge", Action::X),
    (0x0010, 0x1020, "PatientSize", Action::X),
    (0x0010, 0x1030, "PatientWeight", Action::X),
    (0x0010, 0x1040, "PatientAddress", Action::X),
    (0x0010, 0x1050, "InsurancePlanIdentification", Action::X),
    (0x0010, 0x1060, "PatientMotherBirthName", Action::X),
    (0x0010, 0x1080, "MilitaryRank", Action::X),
    (0x0010, 0x1081, "BranchOfService", Action::X),
    (0x0010, 0x1090, "MedicalRecordLocator", Action::X),
    (0x0010, 0x1100, "ReferencedPatientPhotoSequence", Action::X),
    (0x0010, 0x2000, "MedicalAlerts", Action::X),
    (0x0010, 0x2110, "Allergies", Action::X),
    (0x0010, 0x2150, "CountryOfResidence", Action::X),
    (0x0010, 0x2152, "RegionOfResidence", Action::X),
    (0x0010, 0x2154, "PatientTelephoneNumbers", Action::X),
    (0x0010, 0x2155, "PatientTelecomInformation", Action::X),
    (0x0010, 0x2160, "EthnicGroup", Action::X),
    (0x0010, 0x2180, "Occupation", Action::X),
    (0x0010, 0x21A0, "SmokingStatus", Action::X),
    (0x0010, 0x21B0, "AdditionalPatientHistory", Action::X),
    (0x0010, 0x21C0, "PregnancyStatus", Action::X),
    (0x0010, 0x21D0, "LastMenstrualDate", Action::X),
    (0x0010, 0x21F0, "PatientReligiousPreference", Action::X),
    (0x0010, 0x2203, "PatientSexNeutered", Action::Z),
    (0x0010, 0x2297, "ResponsiblePerson", Action::X),
    (0x0010, 0x2299, "ResponsibleOrganization", Action::X),
    (0x0010, 0x4000, "PatientComments", Action::X),
    (0x0018, 0x1000, "DeviceSerialNumber", Action::X),
    (0x0018, 0x1002, "DeviceUID", Action::U),
    (0x0018, 0x1004, "PlateID", Action::X),
    (0x0018, 0x1005, "GeneratorID", Action::X),
    (0x0018, 0x1007, "CassetteID", Action::X),
    (0x0018, 0x1008, "GantryID", Action::X),
    (0x0018, 0x1030, "ProtocolName", Action::X),
    (
        0x0018,
        0x1400,
        "AcquisitionDeviceProcessingDescription",
        Action::X,
    ),
    (0x0018, 0x4000, "AcquisitionComments", Action::X),
    (0x0018, 0x700A, "DetectorID", Action::X),
    (0x0018, 0x9424, "AcquisitionProtocolDescription", Action::X),
    (0x0018, 0x9516, "StartAcquisitionDateTime", Action::X),
    (0x0018, 0x9517, "EndAcquisitionDateTime", Action::X),
    (0x0018, 0xA003, "ContributionDescription", Action::X),
    (0x0020, 0x000D, "StudyInstanceUID", Action::U),
    (0x0020, 0x000E, "SeriesInstanceUID", Action::U),
    (0x0020, 0x0010, "StudyID", Action::Z),
    (0x0020, 0x0052, "FrameOfReferenceUID", Action::U),
    (
        0x0020,
        0x0200,
        "SynchronizationFrameOfReferenceUID",
        Action::U,
    ),
    (0x0020, 0x3401, "ModifyingDeviceID", Action::X),
    (0x0020, 0x3404, "ModifyingDeviceManufacturer", Action::X),
    (0x0020, 0x3406, "ModifiedImageDescription", Action::X),
    (0x0020, 0x4000, "ImageComments", Action::X),
    (0x0020, 0x9158, "FrameComments", Action::X),
    (0x0020, 0x9161, "ConcatenationUID", Action::U),
    (0x0020, 0x9164, "DimensionOrganizationUID", Action::U),
    (0x0028, 0x1199, "PaletteColorLookupTableUID", Action::U),
    (0x0028, 0x4000, "ImagePresentationComments", Action::X),
    (0x0032, 0x0012, "StudyIDIssuer", Action::X),
    (0x0032, 0x1020, "ScheduledStudyLocation", Action::X),
    (0x0032, 0x1021, "ScheduledStudyLocationAETitle", Action::X),
    (0x0032, 0x1030, "ReasonForStudy", Action::X),
    (0x0032, 0x1032, "RequestingPhysician", Action::X),
    (0x0032, 0x1033, "RequestingService", Action::X),
    (0x0032, 0x1060, "RequestedProcedureDescription", Action::X),
    (0x0032, 0x1064, "RequestedProcedureCodeSequence", Action::X),
    (0x0032, 0x1070, "RequestedContrastAgent", Action::X),
    (0x0032, 0x4000, "StudyComments", Action::X),
    (0x0038, 0x0004, "ReferencedPatientAliasSequence", Action::X),
    (0x0038, 0x0010, "AdmissionID", Action::X),
    (0x0038, 0x0011, "IssuerOfAdmissionID", Action::X),
    (
        0x0038,
        0x001E,
        "ScheduledPatientInstitutionResidence",
        Action::X,
    ),
    (0x0038, 0x0020, "AdmittingDate", Action::X),
    (0x0038, 0x0021, "AdmittingTime", Action::X),
    (0x0038, 0x0040, "DischargeDiagnosisDescription", Action::X),
    (0x0038, 0x0050, "SpecialNeeds", Action::X),
    (0x0038, 0x0060, "ServiceEpisodeID", Action::X),
    (0x0038, 0x0061, "IssuerOfServiceEpisodeID", Action::X),
    (0x0038, 0x0062, "ServiceEpisodeDescription", Action::X),
    (0x0038, 0x0300, "CurrentPatientLocation", Action::X),
    (0x0038, 0x0400, "PatientInstitutionResidence", Action::X),
    (0x0038, 0x0500, "PatientState", Action::X),
    (0x0038, 0x4000, "VisitComments", Action::X),
    (0x0040, 0x0001, "ScheduledStationAETitle", Action::X),
    (0x0040, 0x0002, "ScheduledProcedureStepStartDate", Action::X),
    (0x0040, 0x0003, "ScheduledProcedureStepStartTime", Action::X),
    (0x0040, 0x0004, "ScheduledProcedureStepEndDate", Action::X),
    (0x0040, 0x0005, "ScheduledProcedureStepEndTime", Action::X),
    (
        0x0040,
        0x0006,
        "ScheduledPerformingPhysicianName",
        Action::X,
    ),
    (
        0x0040,
        0x0007,
        "ScheduledProcedureStepDescription",
        Action::X,
    ),
    (
        0x0040,
        0x000B,
        "ScheduledPerformingPhysicianIdentificationSequence",
        Action::X,
    ),
    (0x0040, 0x0010, "ScheduledStationName", Action::X),
    (0x0040, 0x0011, "ScheduledProcedureStepLocation", Action::X),
    (0x0040, 0x0012, "PreMedication", Action::X),
    (0x0040, 0x0241, "PerformedStationAETitle", Action::X),
    (0x0040, 0x0242, "PerformedStationName", Action::X),
    (0x0040, 0x0243, "PerformedLocation", Action::X),
    (0x0040, 0x0244, "PerformedProcedureStepStartDate", Action::X),
    (0x0040, 0x0245, "PerformedProcedureStepStartTime", Action::X),
    (0x0040, 0x0250, "PerformedProcedureStepEndDate", Action::X),
    (0x0040, 0x0251, "PerformedProcedureStepEndTime", Action::X),
    (0x0040, 0x0253, "PerformedProcedureStepID", Action::X),
    (
        0x0040,
        0x0254,
        "PerformedProcedureStepDescription",
        Action::X,
    ),
    (0x0040, 0x0275, "RequestAttributesSequence", Action::X),
    (
        0x0040,
        0x0280,
        "CommentsOnThePerformedProcedureStep",
        Action::X,
    ),
    (0x0040, 0x0555, "AcquisitionContextSequence", Action::X),
    (0x0040, 0x1001, "RequestedProcedureID", Action::X),
    (0x0040, 0x1002, "ReasonForTheRequestedProcedure", Action::X),
    (0x0040, 0x1004, "PatientTransportArrangements", Action::X),
    (0x0040, 0x1005, "RequestedProcedureLocation", Action::X),
    (
        0x0040,
        0x1010,
        "NamesOfIntendedRecipientsOfResults",
        Action::X,
    ),
    (
        0x0040,
        0x1011,
        "IntendedRecipientsOfResultsIdentificationSequence",
        Action::X,
    ),
    (
        0x0040,
        0x1101,
        "PersonIdentificationCodeSequence",
        Action::D,
    ),
    (0x0040, 0x1102, "PersonAddress", Action::X),
    (0x0040, 0x1103, "PersonTelephoneNumbers", Action::X),
    (0x0040, 0x1400, "RequestedProcedureComments", Action::X),
    (
        0x0040,
        0x2001,
        "ReasonForTheImagingServiceRequest",
        Action::X,
    ),
    (0x0040, 0x2008, "OrderEnteredBy", Action::X),
    (0x0040, 0x2009, "OrderEntererLocation", Action::X),
    (0x0040, 0x2010, "OrderCallbackPhoneNumber", Action::X),
    (
        0x0040,
        0x2016,
        "PlacerOrderNumberImagingServiceRequest",
        Action::Z,
    ),
    (
        0x0040,
        0x2017,
        "FillerOrderNumberImagingServiceRequest",
        Action::Z,
    ),
    (0x0040, 0x2400, "ImagingServiceRequestComments", Action::X),
    (
        0x0040,
        0x3001,
        "ConfidentialityConstraintOnPatientDataDescription",
        Action::X,
    ),
    (0x0040, 0xA027, "VerifyingOrganization", Action::X),
    (0x0040, 0xA073, "VerifyingObserverSequence", Action::D),
    (0x0040, 0xA075, "VerifyingObserverName", Action::D),
    (0x0040, 0xA078, "AuthorObserverSequence", Action::X),
    (0x0040, 0xA07A, "ParticipantSequence", Action::X),
    (0x0040, 0xA07C, "CustodialOrganizationSequence", Action::X),
    (0x0040, 0xA124, "UID", Action::U),
    (0x0040, 0xA730, "ContentSequence", Action::X),
    (
        0x0040,
        0xDB0C,
        "TemplateExtensionOrganizationUID",
        Action::U,
    ),
    (0x0040, 0xDB0D, "TemplateExtensionCreatorUID", Action::U),
    (0x0070, 0x0084, "ContentCreatorName", Action::Z),
    (
        0x0070,
        0x0086,
        "ContentCreatorIdentificationCodeSequence",
        Action::X,
    ),
    (0x0088, 0x0140, "StorageMediaFileSetUID", Action::U),
    (0x0400, 0x0100, "DigitalSignatureUID", Action::X),
    (
        0x0400,
        0x0402,
        "ReferencedDigitalSignatureSequence",
        Action::X,
    ),
    (
        0x0400,
        0x0403,
        "ReferencedSOPInstanceMACSequence",
        Action::X,
    ),
    (0x0400, 0x0404, "MAC", Action::X),
    (0x0400, 0x0550, "ModifiedAttributesSequence", Action::X),
    (0x0400, 0x0561, "OriginalAttributesSequence", Action::X),
    (0x0400, 0x0561, "OriginalAttributesSequence", Action::X),
    (0x3006, 0x0024, "ReferencedFrameOfReferenceUID", Action::U),
    (0x3006, 0x00C2, "RelatedFrameOfReferenceUID", Action::U),
    (0x4000, 0x0010, "Arbitrary", Action::X),
    (0x4000, 0x4000, "TextComments", Action::X),
    (0x4008, 0x0042, "ResultsIDIssuer", Action::X),
    (0xFFFA, 0xFFFA, "DigitalSignaturesSequence", Action::X),
    (0xFFFC, 0xFFFC, "DataSetTrailingPadding", Action::X),
];

/// The profile's action for `tag`, if the table lists it.
pub fn profile_action(tag: Tag) -> Option<Action> {
    PROFILE
        .iter()
        .find(|(g, e, _, _)| *g == tag.group() && *e == tag.element())
        .map(|(_, _, _, a)| *a)
}

/// SOP classes whose pixel data is not expected to carry burned-in text, so a missing
/// BurnedInAnnotation does not refuse them: CT, Enhanced CT, MR, Enhanced MR, PET, Enhanced PET,
/// Segmentation.
const NO_BURNED_IN_EXPECTED: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.128",
    "1.2.840.10008.5.1.4.1.1.130",
    "1.2.840.10008.5.1.4.1.1.66.4",
];

const SOP_CLASS_UID: Tag = Tag(0x0008, 0x0016);
const SOP_INSTANCE_UID: Tag = Tag(0x0008, 0x0018);
const PATIENT_BIRTH_DATE: Tag = Tag(0x0010, 0x0030);
const PATIENT_NAME: Tag = Tag(0x0010, 0x0010);
const PATIENT_ID: Tag = Tag(0x0010, 0x0020);
const BURNED_IN_ANNOTATION: Tag = Tag(0x0028, 0x0301);
const PATIENT_IDENTITY_REMOVED: Tag = Tag(0x0012, 0x0062);
const DEIDENTIFICATION_METHOD: Tag = Tag(0x0012, 0x0063);
const DEIDENTIFICATION_METHOD_CODE_SEQUENCE: Tag = Tag(0x0012, 0x0064);
const LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED: Tag = Tag(0x0028, 0x0303);
const CODE_VALUE: Tag = Tag(0x0008, 0x0100);
const CODING_SCHEME_DESIGNATOR: Tag = Tag(0x0008, 0x0102);
const CODE_MEANING: Tag = Tag(0x0008, 0x0104);

/// A private attribute kept by the "Retain Safe Private" option: the element `(group,
/// xx<element_low>)` of the block reserved by `creator`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SafePrivateTag {
    /// The private creator string, e.g. `"SIEMENS CT VA0  COAD"`.
    pub creator: String,
    /// The (odd) group.
    pub group: u16,
    /// The low byte of the element number within the creator's block.
    pub element_low: u8,
}

/// An instance after de-identification.
#[derive(Debug, Clone)]
pub struct Deidentified {
    /// The de-identified dataset (no file meta).
    pub object: InMemDicomObject,
    /// The patient pseudonym now in PatientID and PatientName.
    pub patient_pseudonym: String,
    /// The new SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID (empty when absent).
    pub sop_instance_uid: String,
    pub study_uid: String,
    pub series_uid: String,
}

/// Applies the profile with one site's secret. Cheap to share between threads.
pub struct Deidentifier {
    key: [u8; 64],
    policy: DatePolicy,
    safe_private: Vec<SafePrivateTag>,
    mapping: Option<MappingStore>,
    accept_unmarked: bool,
    birth_date: BirthDatePolicy,
}

impl std::fmt::Debug for Deidentifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deidentifier")
            .field("policy", &self.policy)
            .field("safe_private", &self.safe_private)
            .field("mapping", &self.mapping.as_ref().map(|m| m.path.clone()))
            .finish_non_exhaustive()
    }
}

/// Per-instance context while walking the dataset.
struct Walk<'a> {
    deid: &'a Deidentifier,
    shift_days: i64,
    new_pairs: Vec<(String, String)>,
}

impl Deidentifier {
    /// A de-identifier keyed by `secret` (at least [`MIN_SECRET_LEN`] bytes).
    pub fn new(secret: &[u8], policy: DatePolicy) -> Result<Self, DeidError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(DeidError::SecretTooShort { len: secret.len() });
        }
        // HMAC: keys longer than the block are hashed first.
        let mut key = [0u8; 64];
        if secret.len() > 64 {
            key[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            key[..secret.len()].copy_from_slice(secret);
        }
        Ok(Deidentifier {
            key,
            policy,
            safe_private: Vec::new(),
            mapping: None,
            accept_unmarked: false,
            birth_date: BirthDatePolicy::Empty,
        })
    }

    /// A de-identifier keyed by the contents of `path` (trailing whitespace ignored). A key file
    /// readable by group or others is refused ([`DeidError::Permissions`]), like the signing key.
    pub fn from_key_file(path: &Path, policy: DatePolicy) -> Result<Self, DeidError> {
        let read_err = |source| DeidError::ReadKey {
            path: path.to_path_buf(),
            source,
        };
        refuse_loose_mode(path, read_err)?;
        let bytes = std::fs::read(path).map_err(read_err)?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |p| p + 1);
        Self::new(&bytes[..end], policy)
    }

    /// Keeps these private attributes (the "Retain Safe Private" option); none by default.
    pub fn with_safe_private(mut self, tags: Vec<SafePrivateTag>) -> Self {
        self.safe_private = tags;
        self
    }

    /// Accepts instances of SOP classes that may carry burned-in text (secondary capture,
    /// ultrasound, X-ray, ...) when they lack BurnedInAnnotation; refused by default. An instance
    /// whose BurnedInAnnotation is YES is refused whatever this says.
    pub fn with_unmarked_pixels_accepted(mut self, accept: bool) -> Self {
        self.accept_unmarked = accept;
        self
    }

    /// What happens to PatientBirthDate ([`BirthDatePolicy::Empty`] by default).
    pub fn with_birth_date(mut self, policy: BirthDatePolicy) -> Self {
        self.birth_date = policy;
        self
    }

    /// Records every pseudonym it hands out (with the original) in `mapping`.
    pub fn with_mapping(mut self, mapping: MappingStore) -> Self {
        self.mapping = Some(mapping);
        self
    }

    /// The mapping store, if any.
    pub fn mapping(&self) -> Option<&MappingStore> {
        self.mapping.as_ref()
    }

    /// The date policy.
    pub fn policy(&self) -> DatePolicy {
        self.policy
    }

    /// HMAC-SHA256 (RFC 2104) of `domain`, a NUL and `message` under the site key, so pseudonyms
    /// of different kinds never collide.
    fn hmac(&self, domain: &str, message: &[u8]) -> [u8; 32] {
        self.hmac_raw(&[domain.as_bytes(), &[0u8], message])
    }

    /// HMAC-SHA256 of the concatenation of `parts`.
    fn hmac_raw(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for i in 0..64 {
            ipad[i] ^= self.key[i];
            opad[i] ^= self.key[i];
        }
        let mut inner = Sha256::new().chain_update(ipad);
        for p in parts {
            inner.update(p);
        }
        Sha256::new()
            .chain_update(opad)
            .chain_update(inner.finalize())
            .finalize()
            .into()
    }

    /// The pseudonym of a patient: `P` and 20 hex digits of the keyed hash of the PatientID.
    pub fn patient_pseudonym(&self, patient_id: &str) -> String {
        let h = self.hmac("patient", patient_id.trim().as_bytes());
        let mut s = String::from("P");
        for b in &h[..10] {
            s.push_str(&format!("{b:02X}"));
        }
        s
    }

    /// The pseudonymous UID of `uid`: `2.25.` and the decimal of 128 bits of its keyed hash.
    /// DICOM-defined UIDs (`1.2.840.10008.*`) are returned unchanged.
    pub fn remap_uid(&self, uid: &str) -> String {
        let uid = uid.trim_end_matches(['\0', ' ']);
        if uid.is_empty() || uid.starts_with("1.2.840.10008.") {
            return uid.to_string();
        }
        let h = self.hmac("uid", uid.as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[..16]);
        // A leading zero digit is not allowed in a UID component; the top bit keeps it non-zero.
        format!("2.25.{}", u128::from_be_bytes(b) | 1)
    }

    /// The per-patient date shift in days (negative: dates move back), or 0 without shifting.
    pub fn date_shift_days(&self, patient_id: &str) -> i64 {
        match self.policy {
            DatePolicy::ShiftPerPatient { max_days } if max_days > 0 => {
                let h = self.hmac("date-shift", patient_id.trim().as_bytes());
                let n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
                -((n % u64::from(max_days)) as i64 + 1)
            }
            _ => 0,
        }
    }

    /// De-identifies `obj`: applies the profile, pseudonymises, records new pseudonyms in the
    /// mapping store (durably) and adds the de-identification attributes. Refuses instances that
    /// may show burned-in text.
    pub fn deidentify(&self, obj: &InMemDicomObject) -> Result<Deidentified, DeidError> {
        self.check_burned_in(obj)?;

        let patient_key = text(obj, PATIENT_ID)
            .filter(|s| !s.trim().is_empty())
            .or_else(|| text(obj, PATIENT_NAME))
            .unwrap_or_default();
        let pseudonym = self.patient_pseudonym(&patient_key);
        let mut walk = Walk {
            deid: self,
            shift_days: self.date_shift_days(&patient_key),
            new_pairs: vec![(format!("patient:{pseudonym}"), patient_key.clone())],
        };
        let mut out = walk.dataset(obj);
        out.put(DataElement::new(
            PATIENT_ID,
            VR::LO,
            PrimitiveValue::from(pseudonym.as_str()),
        ));
        out.put(DataElement::new(
            PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from(pseudonym.as_str()),
        ));
        self.mark(&mut out);
        if let Some(mapping) = &self.mapping {
            mapping.record(&walk.new_pairs)?;
        }
        Ok(Deidentified {
            sop_instance_uid: text(&out, SOP_INSTANCE_UID).unwrap_or_default(),
            study_uid: text(&out, Tag(0x0020, 0x000D)).unwrap_or_default(),
            series_uid: text(&out, Tag(0x0020, 0x000E)).unwrap_or_default(),
            object: out,
            patient_pseudonym: pseudonym,
        })
    }

    fn check_burned_in(&self, obj: &InMemDicomObject) -> Result<(), DeidError> {
        let refuse = |reason: String| DeidError::BurnedIn { reason };
        match text(obj, BURNED_IN_ANNOTATION) {
            Some(v) if v.trim().eq_ignore_ascii_case("YES") => Err(refuse(
                "BurnedInAnnotation is YES: the pixels show identifying text".to_string(),
            )),
            Some(v) if v.trim().eq_ignore_ascii_case("NO") => Ok(()),
            _ => {
                let class = text(obj, SOP_CLASS_UID).unwrap_or_default();
                if self.accept_unmarked || NO_BURNED_IN_EXPECTED.contains(&class.trim()) {
                    Ok(())
                } else {
                    Err(refuse(format!(
                        "SOP class {class:?} may carry burned-in text and BurnedInAnnotation \
                         does not say NO"
                    )))
                }
            }
        }
    }

    /// Adds PatientIdentityRemoved, DeidentificationMethod and its code sequence.
    fn mark(&self, out: &mut InMemDicomObject) {
        let mut codes = vec![("113100", "Basic Application Confidentiality Profile")];
        let (dates, ltim) = match self.policy {
            DatePolicy::Remove => ("dates removed", "REMOVED"),
            DatePolicy::ShiftPerPatient { .. } => {
                codes.push((
                    "113107",
                    "Retain Longitudinal Temporal Information Modified Dates Option",
                ));
                ("dates shifted per patient", "MODIFIED")
            }
            DatePolicy::KeepYear => {
                codes.push((
                    "113107",
                    "Retain Longitudinal Temporal Information Modified Dates Option",
                ));
                ("dates reduced to the year", "MODIFIED")
            }
        };
        if !self.safe_private.is_empty() {
            codes.push(("113111", "Retain Safe Private Option"));
        }
        out.put(DataElement::new(
            PATIENT_IDENTITY_REMOVED,
            VR::CS,
            PrimitiveValue::from("YES"),
        ));
        out.put(DataElement::new(
            DEIDENTIFICATION_METHOD,
            VR::LO,
            PrimitiveValue::from(format!(
                "Cosilo PS3.15 E.1 Basic Profile; keyed-hash pseudonyms; {dates}"
            )),
        ));
        let items: Vec<InMemDicomObject> = codes
            .into_iter()
            .map(|(value, meaning)| {
                InMemDicomObject::from_element_iter([
                    DataElement::new(CODE_VALUE, VR::SH, PrimitiveValue::from(value)),
                    DataElement::new(
                        CODING_SCHEME_DESIGNATOR,
                        VR::SH,
                        PrimitiveValue::from("DCM"),
                    ),
                    DataElement::new(CODE_MEANING, VR::LO, PrimitiveValue::from(meaning)),
                ])
            })
            .collect();
        out.put(DataElement::new(
            DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(items),
        ));
        out.put(DataElement::new(
            LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
            VR::CS,
            PrimitiveValue::from(ltim),
        ));
    }

    fn safe_private_kept(&self, obj: &InMemDicomObject, tag: Tag) -> bool {
        if self.safe_private.is_empty() {
            return false;
        }
        let (g, e) = (tag.group(), tag.element());
        if (0x0010..=0x00FF).contains(&e) {
            // A private creator: kept when it reserves a block for a kept tag.
            let creator = text(obj, tag).unwrap_or_default();
            return self
                .safe_private
                .iter()
                .any(|s| s.group == g && s.creator.trim() == creator.trim());
        }
        if e < 0x1000 {
            return false;
        }
        let block = e >> 8;
        let creator = text(obj, Tag(g, block)).unwrap_or_default();
        self.safe_private.iter().any(|s| {
            s.group == g && s.element_low == (e & 0xFF) as u8 && s.creator.trim() == creator.trim()
        })
    }
}

impl Walk<'_> {
    fn dataset(&mut self, obj: &InMemDicomObject) -> InMemDicomObject {
        let mut out = Vec::new();
        for elem in obj.iter() {
            if let Some(e) = self.element(obj, elem) {
                out.push(e);
            }
        }
        InMemDicomObject::from_element_iter(out)
    }

    fn element(&mut self, parent: &InMemDicomObject, elem: &InMemElement) -> Option<InMemElement> {
        let tag = elem.tag();
        let vr = elem.vr();
        let g = tag.group();
        if g == 0x0002 {
            return None; // file meta never belongs in the dataset
        }
        if g % 2 == 1 {
            return if self.deid.safe_private_kept(parent, tag) {
                Some(elem.clone())
            } else {
                None
            };
        }
        if (0x5000..=0x50FF).contains(&g) || (0x6000..=0x60FF).contains(&g) {
            return None; // curves and overlays
        }
        let action = profile_action(tag);
        if action.is_none() && vr == VR::UN {
            return None;
        }
        // Sequences: removed, emptied or processed item by item.
        if let Value::Sequence(seq) = elem.value() {
            return match action {
                Some(Action::X) => None,
                Some(Action::Z) => Some(DataElement::new(
                    tag,
                    VR::SQ,
                    DataSetSequence::<InMemDicomObject>::empty(),
                )),
                Some(Action::D) | Some(Action::C) => Some(DataElement::new(
                    tag,
                    VR::SQ,
                    DataSetSequence::<InMemDicomObject>::empty(),
                )),
                _ => {
                    let items: Vec<InMemDicomObject> =
                        seq.items().iter().map(|i| self.dataset(i)).collect();
                    Some(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)))
                }
            };
        }
        // UIDs: remapped wherever they are, unless the table removes or empties them.
        if vr == VR::UI && !matches!(action, Some(Action::X) | Some(Action::Z)) {
            return Some(self.uids(elem));
        }
        if tag == PATIENT_BIRTH_DATE && self.deid.birth_date == BirthDatePolicy::Empty {
            return Some(DataElement::empty(tag, vr));
        }
        if matches!(vr, VR::DA | VR::DT) && action != Some(Action::X) {
            return self.date(elem, action);
        }
        if vr == VR::TM {
            return match (self.deid.policy, action) {
                (_, Some(Action::X)) => None,
                (DatePolicy::Remove, Some(Action::D)) => {
                    Some(DataElement::new(tag, vr, PrimitiveValue::from("000000.00")))
                }
                (DatePolicy::Remove, Some(_)) => Some(DataElement::empty(tag, vr)),
                _ => Some(elem.clone()),
            };
        }
        match action {
            None | Some(Action::K) | Some(Action::U) => Some(elem.clone()),
            Some(Action::X) => None,
            Some(Action::Z) => Some(DataElement::empty(tag, vr)),
            Some(Action::D) | Some(Action::C) => Some(dummy(tag, vr)),
        }
    }

    fn uids(&mut self, elem: &InMemElement) -> InMemElement {
        let values: Vec<String> = match elem.value() {
            Value::Primitive(p) => p.to_multi_str().to_vec(),
            _ => Vec::new(),
        };
        let mapped: Vec<String> = values
            .iter()
            .map(|u| {
                let original = u.trim_end_matches(['\0', ' ']).to_string();
                let new = self.deid.remap_uid(&original);
                if new != original {
                    self.new_pairs.push((format!("uid:{new}"), original));
                }
                new
            })
            .collect();
        DataElement::new(
            elem.tag(),
            VR::UI,
            PrimitiveValue::Strs(mapped.into_iter().collect()),
        )
    }

    fn date(&mut self, elem: &InMemElement, action: Option<Action>) -> Option<InMemElement> {
        let (tag, vr) = (elem.tag(), elem.vr());
        let values: Vec<String> = match elem.value() {
            Value::Primitive(p) => p.to_multi_str().to_vec(),
            _ => Vec::new(),
        };
        let changed: Option<Vec<String>> = match self.deid.policy {
            DatePolicy::Remove => {
                return match action {
                    Some(Action::D) => Some(dummy(tag, vr)),
                    // Dates the table does not list (and those it empties) are emptied.
                    _ => Some(DataElement::empty(tag, vr)),
                };
            }
            DatePolicy::ShiftPerPatient { .. } => values
                .iter()
                .map(|v| shift_date(v.trim(), self.shift_days))
                .collect(),
            DatePolicy::KeepYear => values.iter().map(|v| year_only(v.trim(), vr)).collect(),
        };
        Some(match changed {
            Some(v) if !v.is_empty() => {
                DataElement::new(tag, vr, PrimitiveValue::Strs(v.into_iter().collect()))
            }
            // An empty or unreadable date is emptied rather than kept.
            _ => DataElement::empty(tag, vr),
        })
    }
}

/// Refuses a file that group or others may read (it holds a key or re-identification data).
pub fn refuse_loose_mode(
    path: &Path,
    io_err: impl Fn(std::io::Error) -> DeidError,
) -> Result<(), DeidError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(io_err)?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(DeidError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (path, io_err);
    Ok(())
}

/// A dummy value for the `D` action, valid for the VR.
fn dummy(tag: Tag, vr: VR) -> InMemElement {
    let v = match vr {
        VR::DA => "19000101",
        VR::DT => "19000101000000",
        VR::TM => "000000.00",
        VR::PN => "ANONYMOUS",
        VR::AS => "000Y",
        VR::CS => "ANONYMOUS",
        VR::DS | VR::IS => "0",
        VR::SQ => return DataElement::new(tag, vr, DataSetSequence::<InMemDicomObject>::empty()),
        VR::LO | VR::SH | VR::LT | VR::ST | VR::UT | VR::UC => "ANONYMOUS",
        _ => return DataElement::empty(tag, vr),
    };
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

/// The element's value as text, if it is a primitive string-like value.
fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` days after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Parses the leading `YYYYMMDD` of a DA or DT value.
fn parse_ymd(v: &str) -> Option<(i64, i64, i64)> {
    let b = v.as_bytes();
    if b.len() < 8 || !b[..8].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let y: i64 = v[0..4].parse().ok()?;
    let m: i64 = v[4..6].parse().ok()?;
    let d: i64 = v[6..8].parse().ok()?;
    let max_day = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    (1..=max_day).contains(&d).then_some((y, m, d))
}

/// A DA or DT value moved by `days`; the time part of a DT is kept. None when unreadable.
pub fn shift_date(v: &str, days: i64) -> Option<String> {
    let (y, m, d) = parse_ymd(v)?;
    let (y, m, d) = civil_from_days(days_from_civil(y, m, d) + days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    Some(format!("{y:04}{m:02}{d:02}{}", &v[8..]))
}

/// The number of days between two DA values (b − a), for tests and reports.
pub fn days_between(a: &str, b: &str) -> Option<i64> {
    let (ya, ma, da) = parse_ymd(a)?;
    let (yb, mb, db) = parse_ymd(b)?;
    Some(days_from_civil(yb, mb, db) - days_from_civil(ya, ma, da))
}

fn year_only(v: &str, vr: VR) -> Option<String> {
    let (y, _, _) = parse_ymd(v)?;
    Some(if vr == VR::DT {
        format!("{y:04}0101000000")
    } else {
        format!("{y:04}0101")
    })
}

/// The reverse mapping from pseudonyms to originals, kept inside the hospital for the write-back
/// path: an append-only file of JSON lines (`{"p": pseudonym, "o": original}`, pseudonyms
/// prefixed `patient:` or `uid:`), fsynced before [`MappingStore::record`] returns.
pub struct MappingStore {
    path: PathBuf,
    inner: Mutex<MappingInner>,
}

struct MappingInner {
    file: File,
    map: HashMap<String, String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MappingLine {
    p: String,
    o: String,
}

impl MappingStore {
    /// The file name of the mapping inside the bridge's state directory.
    pub const FILE_NAME: &'static str = "pseudonyms.jsonl";

    /// Opens (or creates, mode 0600) the mapping in `dir`, reading what it holds. A mapping
    /// readable by group or others is refused ([`DeidError::Permissions`]). A torn last line (a crash
    /// mid-append) is ignored; any other damaged line is an error.
    pub fn open(dir: &Path) -> Result<MappingStore, DeidError> {
        let path = dir.join(Self::FILE_NAME);
        let open_err = |source| DeidError::OpenMapping {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let mut options = OpenOptions::new();
        options.create(true).read(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(open_err)?;
        refuse_loose_mode(&path, open_err)?;
        let mut map = HashMap::new();
        let lines: Vec<String> = BufReader::new(&file)
            .split(b'\n')
            .map(|l| l.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .collect::<Result<_, _>>()
            .map_err(open_err)?;
        let n = lines.len();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<MappingLine>(line) {
                Ok(l) => {
                    map.insert(l.p, l.o);
                }
                Err(_) if i + 1 == n => {} // torn final append
                Err(e) => {
                    return Err(DeidError::CorruptMapping {
                        path: path.clone(),
                        line: i + 1,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Ok(MappingStore {
            path,
            inner: Mutex::new(MappingInner { file, map }),
        })
    }

    /// Where the mapping lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records pairs not yet known and fsyncs the file.
    fn record(&self, pairs: &[(String, String)]) -> Result<(), DeidError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = Vec::new();
        let mut added = Vec::new();
        for (p, o) in pairs {
            if inner.map.contains_key(p) || added.iter().any(|(ap, _): &(String, String)| ap == p) {
                continue;
            }
            let line = serde_json::to_string(&MappingLine {
                p: p.clone(),
                o: o.clone(),
            })
            .unwrap_or_default();
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            added.push((p.clone(), o.clone()));
        }
        if added.is_empty() {
            return Ok(());
        }
        let write_err = |source| DeidError::WriteMapping {
            path: self.path.clone(),
            source,
        };
        inner.file.write_all(&buf).map_err(write_err)?;
        inner.file.sync_data().map_err(write_err)?;
        inner.map.extend(added);
        Ok(())
    }

    /// The original PatientID behind a patient pseudonym.
    pub fn original_patient(&self, pseudonym: &str) -> Option<String> {
        self.lookup(&format!("patient:{pseudonym}"))
    }

    /// The original UID behind a pseudonymous UID.
    pub fn original_uid(&self, uid: &str) -> Option<String> {
        self.lookup(&format!("uid:{uid}"))
    }

    fn lookup(&self, key: &str) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.map.get(key).cloned()
    }

    /// How many pseudonyms are recorded.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for MappingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2; the key "Jefe" is shorter than `new` accepts, so set it directly.
        let mut key = [0u8; 64];
        key[..4].copy_from_slice(b"Jefe");
        let d = Deidentifier {
            key,
            policy: DatePolicy::Remove,
            safe_private: Vec::new(),
            mapping: None,
            accept_unmarked: false,
            birth_date: BirthDatePolicy::Empty,
        };
        let mac = d.hmac_raw(&[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn dates_shift_and_round_trip() {
        assert_eq!(shift_date("20240301", -1).as_deref(), Some("20240229"));
        assert_eq!(shift_date("20230101", -365).as_deref(), Some("20220101"));
        assert_eq!(
            shift_date("20230101120000.5", 10).as_deref(),
            Some("20230111120000.5")
        );
        assert_eq!(shift_date("2023", 10), None);
        assert_eq!(shift_date("20231301", 1), None);
        for days in [-100_000i64, -1, 0, 1, 738_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn uids_are_valid_and_standard_ones_kept() {
        let d = Deidentifier::new(b"0123456789abcdef", DatePolicy::Remove).unwrap();
        let u = d.remap_uid("1.2.3.4");
        assert!(u.starts_with("2.25.") && u.len() <= 64, "{u}");
        assert!(!u[5..].starts_with('0'));
        assert_eq!(u, d.remap_uid("1.2.3.4\0"));
        assert_eq!(
            d.remap_uid("1.2.840.10008.5.1.4.1.1.2"),
            "1.2.840.10008.5.1.4.1.1.2"
        );
    }
}
