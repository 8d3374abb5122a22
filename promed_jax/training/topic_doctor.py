"""The scripted topic doctor of real cases (MedQA / MediQ, CMB): the warm start that teaches the protocol.

A data generator for SFT, not a policy under evaluation: it reads the case it consults (its facts and its
gold answer) to script the dialogue. Per case it draws, from (seed, case id), a number of questions in
[0, max_questions] and that many of the facts not known at the start (all of them when fewer), and asks
about each, in the case's order, in its own words: the fact is classified into a topic by keyword rules
(`TOPICS`: vital signs, history, symptoms, examination by body system, laboratory, imaging, pregnancy and
menstruation, treatment so far) and the question is one of the topic's templates ("What is your
temperature?", "Has anyone in your family had heart problems?"), never the fact's text: a template that
shares a run of `MAX_SHARED_WORDS` or more consecutive words with the fact is not used (CJK characters
count as words). A fact that no rule classifies, or whose templates are all used or too close to it, gets
a generic question ("Is there anything else about your symptoms I should know?"); `Plan.fallbacks`
counts them. Whichever patient is configured answers (the `semantic` one from the facts), and the last
turn names the topics whose replies told something and gives the gold option:
`answer: <reason> 【answer: X】` (every gold letter for a multi-answer item).

`write_dialogues` writes its consultations in the dialogue export schema (`training.data`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from promed_jax.backends.base import Message
from promed_jax.consult.patients import Patient
from promed_jax.consult.protocol import doctor_first_message
from promed_jax.consult.rollout import Dialogue, consult
from promed_jax.data.cases import Case
from promed_jax.errors import DataError
from promed_jax.text import prompts
from promed_jax.training.naive_doctor import ScriptedDoctor, dialogue_record, write_records

KIND = "topic"
MAX_SHARED_WORDS = 4  # a question shares no run of this many consecutive words with its fact
FALLBACK = "fallback"


@dataclasses.dataclass(frozen=True)
class Topic:
    """One keyword rule: a fact matching `pattern` (and `context`, when set) is about this topic.

    Attributes:
      name: `<group>/<topic>`, e.g. `vitals/temperature`.
      pattern: searched in the fact (case-insensitive).
      questions: the templates the doctor asks; `{system}` is filled with the fact's body system.
      heard: how the answer turn names what the reply told (`your temperature`).
      context: a second pattern the fact must also match (examination findings need an examination cue).
    """

    name: str
    pattern: re.Pattern[str]
    questions: tuple[str, ...]
    heard: str
    context: re.Pattern[str] | None = None

    def matches(self, fact: str) -> bool:
        return bool(self.pattern.search(fact)) and (self.context is None or bool(self.context.search(fact)))


def _topic(name: str, pattern: str, questions: Sequence[str], heard: str, context: str | None = None) -> Topic:
    return Topic(
        name=name,
        pattern=re.compile(pattern, re.IGNORECASE),
        questions=tuple(questions),
        heard=heard,
        context=re.compile(context, re.IGNORECASE) if context else None,
    )


# Body systems named in history questions ("Has anyone in your family had heart problems?"): the first whose
# pattern the fact matches.
SYSTEMS_EN: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (words, re.compile(pattern, re.IGNORECASE))
    for words, pattern in (
        ("cancer", r"cancer|carcinoma|tumou?r|malignan|lymphoma|leukemia|melanoma|sarcoma"),
        ("heart problems", r"heart|cardi|coronary|myocard|arrhythm|infarct"),
        ("lung problems", r"lung|pulmon|asthma|copd|emphysema|bronch"),
        ("kidney problems", r"kidney|renal|nephr"),
        ("liver problems", r"liver|hepat|cirrho"),
        ("blood sugar problems", r"diabet|glucose|insulin"),
        ("blood pressure problems", r"hypertens|blood pressure"),
        ("blood disorders", r"anemi|bleed|clot|thromb|sickle|hemophil|thalass"),
        ("neurological problems", r"seizure|epilep|stroke|dementia|alzheimer|parkinson|migraine|neuro"),
        ("mental health problems", r"depress|bipolar|schizo|psychiatr|anxiety|suicid|psycho"),
        ("thyroid or hormone problems", r"thyroid|hormon|adrenal|pituitar"),
        ("bowel problems", r"bowel|colitis|crohn|celiac|colon"),
        ("joint or bone problems", r"arthritis|joint|osteo|bone|gout|lupus"),
        ("skin conditions", r"skin|eczema|psoriasis|dermat"),
    )
)

# An examination finding: the fact reports what an examination found (else a body-system word is a symptom).
_EXAM_CUE = (
    r"exam|palpat|auscultat|percussion|inspection|is heard|are heard|appears|appear\b|\bnoted\b|"
    r"\bseen\b|reveal|shows|\bshow\b|demonstrat|palpable|tender|murmur|reflex|crackles|rales|wheez|rhonchi|"
    r"\bsounds?\b|mucous membranes|lymphadenopathy|edema|bruit|distended|distension|\bon (the )?(left|right)|"
    r"\bthere (is|are)\b|visible|observ|decreased|increased|reduced|limited|bilateral|stable|intact|turgor"
)
_VITALS = r"temperature|blood pressure|pulse|heart rate|respirat|oxygen saturation|\bspo2\b"

TOPICS_EN: tuple[Topic, ...] = (
    _topic(
        "history/family",
        r"famil(y|ies)|\b(mother|father|sister|brother|sibling|parent|grandmother|grandfather|grandparent|aunt"
        r"|uncle|cousin)s?('s)? (had|has (?!noticed|observed|been)|have|died|was diagnosed|were diagnosed|suffer)",
        (
            "Has anyone in your family had {system}?",
            "Do any illnesses run in your family?",
            "Have your relatives had any serious illnesses?",
        ),
        "your family",
    ),
    _topic(
        "vitals/all",
        rf"vital signs|({_VITALS}).*({_VITALS})",
        ("What are your vital signs?", "Could you tell me your vital signs?", "What were your vitals when measured?"),
        "your vital signs",
    ),
    _topic(
        "vitals/temperature",
        r"temperature|°\s?[fc]\b|febrile",
        ("What is your temperature?", "Have you measured your temperature?", "How high is your temperature?"),
        "your temperature",
    ),
    _topic(
        "vitals/blood_pressure",
        r"blood pressure|\bbp\b",
        ("What is your blood pressure?", "Has your blood pressure been measured?", "How high is your blood pressure?"),
        "your blood pressure",
    ),
    _topic(
        "vitals/pulse",
        r"pulse|heart rate|beats per minute",
        ("What is your heart rate?", "How fast is your pulse?", "Has your pulse been checked?"),
        "your pulse",
    ),
    _topic(
        "vitals/respiratory_rate",
        r"respirations|respiratory rate|respiration rate|breaths per minute|respirations? (are|is|of)",
        ("How fast are you breathing?", "What is your breathing rate?", "How many breaths per minute do you take?"),
        "your breathing rate",
    ),
    _topic(
        "vitals/oxygen",
        r"oxygen saturation|o2 sat|\bspo2\b|saturat|pulse oximetry",
        ("What is your oxygen level?", "How much oxygen is in your blood?", "What did the pulse oximeter read?"),
        "your oxygen level",
    ),
    _topic(
        "imaging/ecg",
        r"\becg\b|\bekg\b|electrocardiogra|holter",
        ("What did your ECG show?", "Has a heart tracing been done, and what did it show?"),
        "your ECG",
    ),
    _topic(
        "imaging/echocardiogram",
        r"echocardiogra",
        ("What did the ultrasound of your heart show?", "Has an echocardiogram been done?"),
        "your echocardiogram",
    ),
    _topic(
        "imaging/endoscopy",
        r"endoscop|colonoscop|bronchoscop|cystoscop|laparoscop|sigmoidoscop",
        ("What did the scope examination show?", "Has an endoscopy been done, and what was found?"),
        "the endoscopy",
    ),
    _topic(
        "imaging/pathology",
        r"biops|histolog|patholog|cytolog|specimen|aspirat",
        ("What did the biopsy show?", "What did the tissue sample show?", "Has a biopsy been taken?"),
        "the biopsy",
    ),
    _topic(
        "imaging/scan",
        r"x-ray|radiograph|\bct\b|computed tomograph|\bmri\b|magnetic resonance|ultraso|sonogra|imaging|scan\b"
        r"|angiogra|mammogra|doppler|fluorosc|\bpet\b|scintigra|\bscans?\b",
        ("What did the imaging show?", "Have you had any scans, and what did they show?", "What did your X-rays or scans find?"),
        "the imaging",
    ),
    _topic(
        "labs/blood_count",
        r"hemoglobin|hematocrit|leukocyte|white blood cell|\bwbc\b|platelet|\bmcv\b|reticulocyte|neutrophil"
        r"|lymphocyte|eosinophil|blood count|erythrocyte|red blood cell|\brbc\b|\bcbc\b|hemogram",
        ("What did your blood count show?", "What were your hemoglobin and blood cell counts?", "Was a blood count done?"),
        "your blood count",
    ),
    _topic(
        "labs/chemistry",
        r"sodium|potassium|chloride|bicarbonate|\bhco3|calcium|magnesium|phosph|creatinine|\burea\b|\bbun\b"
        r"|electrolyte|osmolal|\bna\+|\bk\+|\bcl-",
        ("What were your electrolyte and kidney results?", "What did your blood chemistry show?", "Were your salts and kidney function checked?"),
        "your blood chemistry",
    ),
    _topic(
        "labs/liver",
        r"bilirubin|\balt\b|\bast\b|alkaline phosphatase|albumin|transaminase|aminotransferase|\bggt\b|liver function",
        ("What did your liver tests show?", "Were your liver enzymes checked?"),
        "your liver tests",
    ),
    _topic(
        "labs/endocrine",
        r"glucose|hba1c|hemoglobin a1c|\btsh\b|thyro|\bt4\b|\bt3\b|cortisol|hormone|prolactin|\bacth\b|\bhcg\b"
        r"|insulin level|testosterone|estrogen|estradiol|aldosterone|renin|\bpth\b|vitamin",
        ("What were your hormone or blood sugar results?", "Were your blood sugar and hormone levels measured?"),
        "your hormone and sugar levels",
    ),
    _topic(
        "labs/blood_gas",
        r"arterial blood gas|\bph\b|pco2|po2|\bpao2|\bpaco2|lactate|anion gap",
        ("What did your blood gas show?", "What was the acid level of your blood?"),
        "your blood gas",
    ),
    _topic(
        "labs/coagulation",
        r"prothrombin|\bpt\b|\bptt\b|\binr\b|fibrin|coagul|d-dimer|bleeding time|clotting",
        ("What did your clotting tests show?", "How well does your blood clot on testing?"),
        "your clotting tests",
    ),
    _topic(
        "labs/csf",
        r"cerebrospinal|\bcsf\b|lumbar puncture|spinal tap",
        ("What did the spinal fluid test show?", "Was a spinal tap done?"),
        "your spinal fluid",
    ),
    _topic(
        "labs/urine",
        r"urinalysis|urine (test|studies|culture|sample|shows|analysis|dipstick|is|was|osmol|sodium|protein)"
        r"|in (the|his|her) urine|urinary \w+ (test|level)|cast",
        ("What did your urine test show?", "Was your urine tested?"),
        "your urine test",
    ),
    _topic(
        "labs/microbiology",
        r"culture|gram|stain|bacteri|organism|pathogen|\bvir(us|al)\b|serolog|\bpcr\b|antigen|\bhiv\b|hepatitis \w"
        r"|swab|smear|resistant|susceptib",
        ("What did the cultures or infection tests show?", "Were any germs found on testing?", "What did the infection tests find?"),
        "the infection tests",
    ),
    _topic(
        "labs/immunology",
        r"antibod|complement|\bana\b|immunoglobulin|\big[gaem]\b|b cell|t cell|\bcd4|\bcd8|autoantibod|titer",
        ("What did your immune tests show?", "Were antibody tests done?"),
        "your immune tests",
    ),
    _topic(
        "labs/lung_function",
        r"fev1|\bfvc\b|spirometr|pulmonary function|peak flow|dlco",
        ("What did your breathing tests show?", "Have you had lung function testing?"),
        "your breathing tests",
    ),
    _topic(
        "labs/general",
        r"laborator|\blabs?\b|blood test|serum|plasma|\blevels?\b|\bcounts?\b|concentration|assay|\btests?\b|"
        r"positive|negative|screen|within (the )?(normal|reference)|/dl|/l\b|/ml|/mm3|mmol|meq|mg/|u/l|troponin|"
        r"lipid (panel|profile)|\bldl\b|\bhdl\b|cholesterol (level|is|of)|triglycerid|c-reactive|\bcrp\b|sedimentation|\besr\b|karyotype|genetic|mutation|gene\b",
        ("What did your blood tests show?", "What were the results of your tests?", "Have any tests been done yet?"),
        "your test results",
    ),
    _topic(
        "exam/heart",
        r"heart|cardiac|\bs[1-4]\b|gallop|pericardi|jugular|\bjvp\b|murmur|precordi|apex beat",
        ("What did the doctor hear when listening to your heart?", "Was anything found on the heart exam?"),
        "your heart examination",
        _EXAM_CUE,
    ),
    _topic(
        "exam/lungs",
        r"lung|breath sounds|crackles|rales|wheez|rhonchi|chest|fremitus|pulmonary|respiratory|stridor|pleura",
        ("What did the doctor hear in your lungs?", "Was anything found when your chest was examined?"),
        "your chest examination",
        _EXAM_CUE,
    ),
    _topic(
        "exam/abdomen",
        r"abdom|liver|spleen|hepat|bowel sounds|rectal|hernia|epigastr|quadrant|umbilic|flank|inguinal|ascites",
        ("What did the doctor find when examining your belly?", "Was your belly tender or swollen on examination?"),
        "your abdominal examination",
        _EXAM_CUE,
    ),
    _topic(
        "exam/neurological",
        r"reflex|strength|sensation|gait|cranial|pupil|neurolog|tremor|orient|conscious|mental status|ataxia"
        r"|nystagmus|babinski|romberg|\btone\b|glasgow|coordination|alert|confused|somnolent|obtunded|speech",
        ("What did the nerve and brain examination show?", "Were your reflexes, strength and sensation tested?"),
        "your neurological examination",
        _EXAM_CUE,
    ),
    _topic(
        "exam/skin",
        r"skin|rash|lesion|erythem|patch|papul|macul|vesic|ulcer|jaundice|icter|pallor|pale|cyanos|bruis|petechi"
        r"|nodule|plaque|eczema|\bhair\b|\bnails?\b|wound|scar|purpur|blister|pustul",
        ("What did the doctor see on your skin?", "Were any skin changes found on examination?"),
        "your skin examination",
        _EXAM_CUE,
    ),
    _topic(
        "exam/head_neck",
        r"\beyes?\b|conjunctiv|retina|fundus|fundoscop|sclera|\bears?\b|tympanic|\bnose\b|nasal|nares|throat|pharyn"
        r"|tonsil|oral|mouth|tongue|teeth|gums?\b|\bneck\b|thyroid|lymph node|lymphadenopathy|mucous membranes"
        r"|\blips?\b|face|facial|head\b|scalp|palat",
        ("What did the doctor find in your head and neck?", "Was anything found when your eyes, ears, mouth or neck were examined?"),
        "your head and neck examination",
        _EXAM_CUE,
    ),
    _topic(
        "exam/genital",
        r"pelvic|vagin|cervi[cx]|uter|ovar|adnex|penis|penile|scrot|testi|breast|genital|prostat|vulva|labia",
        ("What did the genital or pelvic examination show?", "Was anything found on the pelvic or breast exam?"),
        "your genital examination",
        _EXAM_CUE,
    ),
    _topic(
        "exam/limbs",
        r"joint|knee|hip|shoulder|elbow|wrist|ankle|spine|spinal|\bback\b|extremit|muscle|swelling|edema|motion"
        r"|bone|fracture|\blegs?\b|\barms?\b|hands?\b|\bfeet\b|\bfoot\b|finger|toe\b|calf|thigh|pulses",
        ("What did the doctor find when examining your joints and limbs?", "Were your arms, legs or joints examined?"),
        "your limb examination",
        _EXAM_CUE,
    ),
    _topic(
        "exam/general",
        r"physical exam|examination|\bon exam|appears|distress|lethargic|diaphoretic|well-nourished|ill-appearing"
        r"|\bbmi\b|body mass index|percentile|height|\bweighs\b|cachectic|obese|dehydrated|toxic",
        ("What did the physical examination show?", "How did you look to the examining doctor?", "What was found when you were examined?"),
        "the examination",
    ),
    _topic(
        "history/pregnancy",
        r"pregnan|gestation|gravida|\bpara\b|trimester|fetal|fetus|deliver|birth|prenatal|obstetric|cesarean|"
        r"caesarean|miscarriage|abortion|postpartum|breastfe|contracepti|\biud\b|contractions|labor\b",
        ("Are you pregnant, or have you been pregnant before?", "Could you tell me about your pregnancies?", "How has the pregnancy gone so far?"),
        "your pregnancy history",
    ),
    _topic(
        "history/menstrual",
        r"menstru|menses|menarche|menopaus|\bperiods?\b|\bcycles?\b|vaginal bleeding|spotting",
        ("When was your last period?", "Are your periods regular?", "Could you describe your menstrual cycle?"),
        "your periods",
    ),
    _topic(
        "history/allergies",
        r"allerg|anaphyla",
        ("Do you have any allergies?", "Are you allergic to anything?", "Have you ever reacted badly to a medicine?"),
        "your allergies",
    ),
    _topic(
        "history/vaccination",
        r"vaccin|immuniz|immunis",
        ("Are your vaccinations up to date?", "Which vaccines have you had?"),
        "your vaccinations",
    ),
    _topic(
        "history/smoking",
        r"smok|cigar|tobacco|pack-year|pack year|vap(e|ing)|nicotine",
        ("Do you smoke?", "Have you ever used tobacco?", "How much do you smoke?"),
        "your smoking",
    ),
    _topic(
        "history/alcohol",
        r"alcohol|drink|beer|wine|liquor|ethanol|intoxicat",
        ("Do you drink alcohol?", "How much alcohol do you drink?", "How often do you have a drink?"),
        "your drinking",
    ),
    _topic(
        "history/drugs",
        r"illicit|cocaine|heroin|marijuana|cannabis|intravenous drug|recreational|methamphetamine|substance"
        r"|injection drug|\bdrug use|opioid use|amphetamine|track marks|needles?\b",
        ("Do you use any recreational drugs?", "Have you ever used street drugs?"),
        "your drug use",
    ),
    _topic(
        "history/medications",
        r"medication|\btakes\b|\btaking\b|\btook\b|prescri|supplement|inhaler|\bmg\b|tablets?|pills?|\bdrugs?\b"
        r"|therapy with|treated with|treatment with|placed on|\b(is|was|currently) on [a-z]+|regimen|managed medically",
        ("Do you take any medications?", "What medicines are you on?", "Which drugs have you been taking?"),
        "your medications",
    ),
    _topic(
        "history/surgery",
        r"surg|operat|underwent|\w+ectomy\b|\w+otomy\b|\w+plasty\b|repair|transplant|bypass|implant",
        ("Have you had any operations?", "Have you ever had surgery?"),
        "your operations",
    ),
    _topic(
        "history/sexual",
        r"sexual|sexually|condom|partner|intercourse|\bsex\b|monogam",
        ("Could you tell me about your sexual activity?", "Are you sexually active?", "Do you use protection during sex?"),
        "your sexual history",
    ),
    _topic(
        "history/travel",
        r"travel|\btrip\b|visit(ed)?|returned from|camping|hiking|vacation|abroad|outdoors|immigrat|emigrat|country",
        ("Have you travelled anywhere recently?", "Have you been on any trips or spent time outdoors?"),
        "your travel",
    ),
    _topic(
        "history/occupation",
        r"works? (as|at|in|on)|occupation|employ|\bjob\b|factory|farmer|retired|student|worker|profession|career"
        r"|construction|military|soldier|veteran|office|\bnurse\b|teacher|engineer|marine\b|calls? in sick",
        ("What do you do for a living?", "What kind of work do you do?"),
        "your work",
    ),
    _topic(
        "history/social",
        r"\blives\b|living|home|housing|married|divorced|widow|homeless|shelter|nursing facility|caretaker|roommate",
        ("Who do you live with?", "What is your living situation?"),
        "your home life",
    ),
    _topic(
        "history/diet",
        r"\bdiet|\beats?\b|eating|\bfood|meals?\b|appetite|vegetarian|vegan|nutrition|fasting|restaurant|calori",
        ("What is your diet like?", "How has your appetite been?", "What do you usually eat?"),
        "your diet",
    ),
    _topic(
        "history/development",
        r"develop|milestone|growth|school|grade\b|born\b|newborn|infant|neonat",
        ("How has the child grown and developed so far?", "Were there any problems around birth or in early childhood?"),
        "the child's development",
    ),
    _topic(
        "history/past_medical",
        r"history|diagnosed|chronic|\bknown\b|hypertension|diabetes|asthma|hepatitis|cancer|disease|disorder"
        r"|syndrome|condition|previous|prior|\bpast\b|hospitali[sz]|failure|sclerosis|\w+itis\b|\w+osis\b|\w+pathy\b"
        r"|healthy|\bfeels? well",
        ("Have you ever had {system}?", "Do you have any medical conditions?", "Have you been diagnosed with anything in the past?"),
        "your medical history",
    ),
    _topic(
        "symptoms/fever",
        r"fever|chills|rigors|night sweats|sweating",
        ("Have you had a fever or chills?", "Have you felt hot or been sweating at night?"),
        "your fevers",
    ),
    _topic(
        "symptoms/breathing",
        r"cough|sputum|phlegm|shortness of breath|dyspnea|breath|wheez|hemoptysis",
        ("Have you had a cough or trouble breathing?", "Do you get short of breath?", "Are you coughing anything up?"),
        "your breathing",
    ),
    _topic(
        "symptoms/nausea",
        r"nause|vomit|emesis|retch",
        ("Have you felt sick to your stomach or thrown up?", "Any nausea or vomiting?"),
        "your nausea",
    ),
    _topic(
        "symptoms/bowel",
        r"diarrh|constipat|stool|bowel|feces|faeces|melena|hematochezia|flatus",
        ("How are your bowel movements?", "Have you noticed any change in your stools?"),
        "your bowel habits",
    ),
    _topic(
        "symptoms/urinary",
        r"urin|dysuria|void|bladder|incontinen|nocturia|polyuria",
        ("Do you have any trouble passing water?", "Have you noticed any change when you pee?"),
        "your urination",
    ),
    _topic(
        "symptoms/weight",
        r"weight|pounds|\blbs?\b|\bkg\b|\blost\b|gained",
        ("Has your weight changed lately?", "Have you lost or gained weight?"),
        "your weight",
    ),
    _topic(
        "symptoms/sleep",
        r"sleep|insomnia|snor|wak(e|es|ing) up|nap",
        ("How are you sleeping?", "Do you have any trouble sleeping?"),
        "your sleep",
    ),
    _topic(
        "symptoms/mood",
        r"mood|depress|anxi|\bsad\b|irritab|hallucinat|suicid|angry|anger|outburst|behavio|interest|worr|stress"
        r"|panic|paranoi|voices|hopeless|guilt|agitat|emotion",
        ("How has your mood been?", "Have you been feeling down, anxious or not yourself?"),
        "your mood",
    ),
    _topic(
        "symptoms/fatigue",
        r"tired|fatigue|weak|malaise|energy|letharg|exhaust",
        ("Have you felt tired or weak?", "How is your energy?"),
        "your energy",
    ),
    _topic(
        "symptoms/neurological",
        r"headache|dizz|vertigo|numb|tingl|seiz|confus|faint|syncope|vision|blurr|memory|speech|balance|passed out"
        r"|convuls|paralys|hearing|conscious|unresponsive|jerk|stiffen|movements?\b|photophobia|visual|pinprick",
        ("Have you had headaches, dizziness or numbness?", "Any problems with your vision, memory or balance?"),
        "your neurological symptoms",
    ),
    _topic(
        "symptoms/skin",
        r"rash|itch|lesion|bump|lump|spots?\b|bruis|swell|blister|redness|hives",
        ("Have you noticed any rash, lumps or swelling?", "Have you had any skin changes?"),
        "your skin",
    ),
    _topic(
        "symptoms/bleeding",
        r"bleed|blood",
        ("Have you noticed any bleeding?", "Have you seen blood anywhere?"),
        "any bleeding",
    ),
    _topic(
        "symptoms/pain",
        r"pain|ache|tender|cramp|discomfort|hurt|sore|burning|colic",
        ("Where exactly does it hurt, and what does it feel like?", "Could you describe the pain?", "Where is the pain and does it spread?"),
        "your pain",
    ),
    _topic(
        "history/injury",
        r"accident|injur|trauma|\bfell\b|\bfall\b|collision|crash|assault|wound|bitten|\bbite\b|burn",
        ("Have you been hurt or injured recently?", "Could you tell me how you got hurt?"),
        "your injury",
    ),
    _topic(
        "history/demographics",
        r"\bage\b|years? old|year-old|month-old|gender|\bmale\b|\bfemale\b|\bman\b|\bwoman\b|\bboy\b|\bgirl\b",
        ("How old are you?", "Could you tell me your age and sex?"),
        "your age",
    ),
    _topic(
        "symptoms/onset",
        r"\bago\b|since|began|started|onset|for the past|sudden|gradual|\bweeks?\b|\bmonths?\b|\bdays?\b|\bhours?\b"
        r"|\byears?\b|episode|similar|recurr|worse|improv|after|before",
        ("When did this start, and how has it changed?", "How long has this been going on?", "Has this happened before?"),
        "how it started",
    ),
    _topic(
        "course/treatment",
        r"treated|given|administered|started on|received|therapy|physician|admitted|hospital|follow-up|referred"
        r"|emergency|ambulance|paramedic|clinic|resuscitat|intubat|transfus",
        ("What has been done for you so far?", "What treatment have you had for this?"),
        "what was done so far",
    ),
)

FALLBACKS_EN = (
    "Is there anything else about your symptoms I should know?",
    "Is there anything else you have noticed?",
    "Is there anything else about your health you think is important?",
    "What else can you tell me about how you have been?",
)

_ZH_SYSTEMS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (words, re.compile(pattern))
    for words, pattern in (
        ("肿瘤", r"癌|瘤"),
        ("心脏病", r"心"),
        ("肺病", r"肺|哮喘"),
        ("肾病", r"肾"),
        ("肝病", r"肝"),
        ("糖尿病", r"糖"),
        ("高血压", r"高血压"),
    )
)

TOPICS_ZH: tuple[Topic, ...] = (
    _topic("history/family", r"家族|父亲|母亲|父母|兄弟|姐妹|家人|亲属", ("您家里有人得过{system}吗？", "家里人有类似的病吗？"), "家族史"),
    _topic("vitals/temperature", r"体温|℃|°C|发热|发烧", ("您的体温是多少？", "您发烧吗？"), "体温"),
    _topic("vitals/blood_pressure", r"血压|mmHg", ("您的血压是多少？", "量过血压吗？"), "血压"),
    _topic("vitals/pulse", r"脉搏|心率|脉", ("您的心率是多少？", "脉搏怎么样？"), "脉搏"),
    _topic("vitals/respiratory_rate", r"呼吸\d|呼吸频率|次/分", ("您呼吸快吗？", "每分钟呼吸多少次？"), "呼吸"),
    _topic("imaging/scan", r"CT|MRI|X线|B超|超声|彩超|胸片|造影|影像|心电图|内镜|胃镜|肠镜", ("做过影像检查吗？结果怎样？", "拍片或超声检查发现了什么？"), "影像检查"),
    _topic("labs/general", r"血常规|尿常规|化验|检验|白细胞|血红蛋白|血小板|血糖|肌酐|抗体|培养|阳性|阴性|指标|升高|降低|mmol|g/L", ("化验结果怎么样？", "血液或尿液检查有什么异常？"), "化验结果"),
    _topic("exam/general", r"查体|体检|检查|听诊|触诊|压痛|叩诊|可见|可闻|体征", ("体格检查发现了什么？", "医生检查时发现了什么？"), "体格检查"),
    _topic("history/pregnancy", r"妊娠|怀孕|孕|分娩|产|胎", ("您怀孕了吗？以前怀过孕吗？", "这次怀孕情况怎么样？"), "孕产史"),
    _topic("history/menstrual", r"月经|经期|闭经|绝经|白带", ("您的月经正常吗？", "末次月经是什么时候？"), "月经情况"),
    _topic("history/allergies", r"过敏", ("您对什么过敏吗？", "有药物过敏史吗？"), "过敏史"),
    _topic("history/smoking", r"吸烟|抽烟|烟", ("您抽烟吗？", "吸烟多少年了？"), "吸烟史"),
    _topic("history/alcohol", r"饮酒|喝酒|酒", ("您喝酒吗？", "平时饮酒多吗？"), "饮酒史"),
    _topic("history/medications", r"服用|用药|口服|注射|治疗|药", ("您现在在用什么药？", "之前用过哪些药物或治疗？"), "用药情况"),
    _topic("history/surgery", r"手术|术后|切除", ("您做过手术吗？", "以前动过手术吗？"), "手术史"),
    _topic("history/occupation", r"工作|职业|工人|农民|学生|退休", ("您是做什么工作的？", "您的职业是什么？"), "职业"),
    _topic("history/past_medical", r"病史|既往|曾|诊断|患有|多年", ("您以前得过{system}吗？", "您以前有什么病吗？"), "既往史"),
    _topic("symptoms/fever", r"寒战|出汗|盗汗", ("有没有发冷或出汗？", "晚上出汗吗？"), "发热情况"),
    _topic("symptoms/breathing", r"咳|痰|喘|气短|气促|呼吸困难|胸闷", ("您咳嗽或气短吗？", "呼吸怎么样？"), "呼吸情况"),
    _topic("symptoms/nausea", r"恶心|呕吐|吐", ("有恶心或呕吐吗？", "想吐吗？"), "恶心呕吐"),
    _topic("symptoms/bowel", r"大便|腹泻|便秘|便血|黑便|排便", ("大便怎么样？", "排便有变化吗？"), "大便情况"),
    _topic("symptoms/urinary", r"小便|尿|排尿", ("小便正常吗？", "排尿有什么不舒服？"), "小便情况"),
    _topic("symptoms/weight", r"体重|消瘦|瘦|胖", ("体重有变化吗？", "最近瘦了吗？"), "体重变化"),
    _topic("symptoms/sleep", r"睡眠|失眠|入睡|多梦", ("睡得好吗？", "睡眠怎么样？"), "睡眠"),
    _topic("symptoms/mood", r"情绪|抑郁|焦虑|烦躁|心情|易怒", ("最近心情怎么样？", "情绪有变化吗？"), "情绪"),
    _topic("symptoms/fatigue", r"乏力|疲劳|无力|疲倦|倦怠", ("您觉得累或没力气吗？", "精神怎么样？"), "精神体力"),
    _topic("symptoms/pain", r"痛|疼|酸|胀", ("哪里疼？是什么样的疼？", "疼痛是什么感觉？"), "疼痛"),
    _topic("symptoms/onset", r"天|周|月|年|小时|开始|突然|反复|加重", ("这是什么时候开始的？", "病了多久了？"), "起病经过"),
)

FALLBACKS_ZH = ("还有什么其他不舒服吗？", "还有什么您觉得重要的情况吗？", "还有别的症状吗？")

TOPICS = {"en": TOPICS_EN, "zh": TOPICS_ZH}
SYSTEMS = {"en": SYSTEMS_EN, "zh": _ZH_SYSTEMS}
FALLBACKS = {"en": FALLBACKS_EN, "zh": FALLBACKS_ZH}
_NO_SYSTEM = {"en": "any serious illness", "zh": "什么大病"}
_WORD = re.compile(r"[\u4e00-\u9fff]|[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased words (ASCII letters and digits), each CJK character a word of its own."""
    return _WORD.findall(text.lower())


def shares_run(question: str, fact: str, n: int = MAX_SHARED_WORDS) -> bool:
    """Whether `question` holds a run of `n` consecutive words of `fact`."""
    q, f = words(question), words(fact)
    grams = {tuple(f[i : i + n]) for i in range(len(f) - n + 1)}
    return any(tuple(q[i : i + n]) in grams for i in range(len(q) - n + 1))


def classify(fact: str, language: str = "en") -> Topic | None:
    """The first topic whose keyword rule the fact matches (rules in `TOPICS` order), or None."""
    return next((t for t in TOPICS[language] if t.matches(fact)), None)


def _system(fact: str, language: str) -> str:
    return next((w for w, p in SYSTEMS[language] if p.search(fact)), _NO_SYSTEM[language])


def candidate_questions(fact: str, language: str = "en") -> tuple[str | None, tuple[str, ...]]:
    """(topic name or None, the topic's questions usable for this fact: filled and not too close to it)."""
    topic = classify(fact, language)
    if topic is None:
        return None, ()
    system = _system(fact, language)
    filled = (q.format(system=system) for q in topic.questions)
    return topic.name, tuple(q for q in filled if not shares_run(q, fact))


@dataclasses.dataclass(frozen=True)
class Question:
    """One scripted question: the fact it targets (index into the case's facts), its topic and text."""

    fact: int
    topic: str
    text: str
    heard: str

    @property
    def fallback(self) -> bool:
        return self.topic == FALLBACK


@dataclasses.dataclass(frozen=True)
class Plan:
    """A case's scripted consultation: the questions in order, then the answer's letters.

    Attributes:
      questions: [K] the questions, K in [0, max_questions].
      letters: the gold letters.
    """

    questions: tuple[Question, ...]
    letters: tuple[str, ...]

    @property
    def fallbacks(self) -> int:
        return sum(q.fallback for q in self.questions)


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, digest])


def plan_case(case: Case, *, seed: int, max_questions: int) -> Plan:
    """The questions the topic doctor asks in `case` and its answer, a function of (seed, case id)."""
    rng = case_rng(seed, case.id)
    known = set(case.known)
    unknown = [i for i in range(case.n_facts) if i not in known]
    k = min(int(rng.integers(0, max_questions + 1)), len(unknown))
    chosen = sorted(unknown[j] for j in rng.permutation(len(unknown))[:k])
    used: set[str] = set()
    questions = []
    for i in chosen:
        name, options = candidate_questions(case.facts[i], case.language)
        options = tuple(q for q in options if q not in used)
        topic = next(t for t in TOPICS[case.language] if t.name == name) if options else None
        if topic is None:
            options = tuple(q for q in FALLBACKS[case.language] if q not in used and not shares_run(q, case.facts[i]))
            options = options or FALLBACKS[case.language][:1]
        text = options[int(rng.integers(len(options)))]
        used.add(text)
        questions.append(
            Question(fact=i, topic=topic.name if topic else FALLBACK, text=text, heard=topic.heard if topic else "")
        )
    return Plan(questions=tuple(questions), letters=tuple(case.answer))


def answer_turn(case: Case, heard: Sequence[str]) -> str:
    """The final turn: the topics whose replies told something, the gold option(s), the bracketed letters."""
    gold = [case.options[letter] for letter in case.answer]
    letters = "".join(case.answer)
    if case.language == "zh":
        reason = f"根据{'、'.join(heard)}" if heard else "根据已知信息"
        return f"answer: {reason}，最可能的答案是{'、'.join(gold)}。【正确答案是{letters}】"
    reason = f"Given what I heard about {_join_en(heard)}" if heard else "From the information given"
    named = " and ".join(gold)
    verb = "answers are" if case.multi_answer else "answer is"
    return f"answer: {reason}, the most likely {verb} {named}. 【answer: {letters}】"


def _join_en(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class TopicDoctor(ScriptedDoctor):
    """A `ChatBackend` that plays the topic doctor (module doc) in the given cases, found by first message."""

    def __init__(self, cases: Sequence[Case], *, seed: int, max_questions: int, protocol_max_questions: int):
        self.seed = seed
        self.plans: dict[str, tuple[Case, Plan]] = {}
        for case in cases:
            first = doctor_first_message(case, mode="proactive", max_questions=protocol_max_questions)
            if first in self.plans and self.plans[first][0].id != case.id:
                raise DataError(f"cases {self.plans[first][0].id} and {case.id} give the doctor the same first message")
            self.plans[first] = (case, plan_case(case, seed=seed, max_questions=max_questions))

    def _turn(self, messages: list[Message]) -> str:
        case, plan = self.plans[messages[0]["content"]]
        asked = sum(m["role"] == "assistant" for m in messages)
        if asked < len(plan.questions):
            return "question: " + plan.questions[asked].text
        cannot = prompts.PATIENT_CANNOT_ANSWER[case.language]
        replies = [m["content"] for m in messages[2::2]]
        heard = []
        for q, reply in zip(plan.questions, replies, strict=False):
            if reply.strip() != cannot and q.heard and q.heard not in heard:
                heard.append(q.heard)
        return answer_turn(case, heard)


def write_dialogues(
    cases: Sequence[Case],
    patient: Patient,
    path: str | pathlib.Path,
    *,
    seed: int,
    max_questions: int,
    protocol_max_questions: int,
) -> list[dict]:
    """Consults every case with the topic doctor and writes the file whole (atomically); returns its records
    (each with, per question, `topics`, `targets`: the index of the fact it was about, and `revealed`: the
    facts its reply revealed, None where the patient cannot know)."""
    policy = {"kind": KIND, "seed": seed, "max_questions": max_questions}
    by_id = {}
    for group in _distinct_first_messages(cases, protocol_max_questions):
        doctor = TopicDoctor(
            group, seed=seed, max_questions=min(max_questions, protocol_max_questions), protocol_max_questions=protocol_max_questions
        )
        for d in consult(group, doctor, patient, mode="proactive", max_questions=protocol_max_questions):
            by_id[d.case.id] = _record(d, doctor, policy)
    records = [by_id[c.id] for c in cases]
    write_records(path, records)
    return records


def _distinct_first_messages(cases: Sequence[Case], max_questions: int) -> list[list[Case]]:
    """The cases in groups within which no two give the doctor the same first message (the doctor finds its
    case by it): two cases that differ only in what the doctor is not told are consulted apart."""
    groups: list[tuple[set[str], list[Case]]] = []
    for case in cases:
        first = doctor_first_message(case, mode="proactive", max_questions=max_questions)
        group = next((g for g in groups if first not in g[0]), None)
        if group is None:
            group = (set(), [])
            groups.append(group)
        group[0].add(first)
        group[1].append(case)
    return [g[1] for g in groups]


def _record(d: Dialogue, doctor: TopicDoctor, policy: Mapping) -> dict:
    first = d.messages[0]["content"]
    plan = doctor.plans[first][1]
    record = dialogue_record(d, policy=dict(policy))
    record["topics"] = [q.topic for q in plan.questions]
    record["targets"] = [q.fact for q in plan.questions]
    record["revealed"] = [None if r is None else list(r) for r in d.revealed[: d.n_questions]]
    return record
