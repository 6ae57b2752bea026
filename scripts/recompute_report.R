#!/usr/bin/env Rscript
# Recompute the VBQ Registry QI report's figures with R (survival, pROC) from the exported
# analysis table (/reports/cohort.csv, either role). Independent of the Python code: a QI lead
# or statistician can run it on any export and compare with the page.
#
#   Rscript scripts/recompute_report.R cohort.csv [threshold=3.0]
#
# Prints one "key value" line per figure. Conventions, the same as the report's
# (docs/reports.md): Cox models use max(time, 0.5) days and Efron ties, the PH test is
# cox.zph(transform = "rank"); the ROC keeps patients
# with a fracture within 730 days (cases) or followed fracture-free to 730 days (controls); the
# cumulative/dynamic AUC weights cases by 1 / G(T_i), G the Kaplan-Meier estimate of the
# censoring distribution with fractures taken before censorings at tied times and G read at
# T_i itself (as scikit-survival does); follow-up quartiles by reverse Kaplan-Meier in months
# of 30.4375 days; KPI eligibility = high VBQ and followup_days >= the window.
suppressPackageStartupMessages({
  library(survival)
  library(pROC)
})
args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 1) stop("usage: recompute_report.R cohort.csv [threshold]")
threshold <- if (length(args) >= 2) as.numeric(args[2]) else 3.0
horizon <- 730
d <- read.csv(args[1], stringsAsFactors = FALSE, na.strings = c("", "NA"))
out <- function(key, value) {
  cat(key, if (is.na(value)) "NA" else formatC(value, digits = 12, format = "g"), "\n")
}

# Incidence over every patient: events per 100 person-years, exact Poisson CI.
ev <- sum(d$event)
py <- sum(d$time_days) / 365.25
out("inc.rate", 100 * ev / py)
ci <- poisson.test(ev, T = py)$conf.int
out("inc.lo", 100 * ci[1])
out("inc.hi", 100 * ci[2])

u <- d[!is.na(d$vbq_used), ]
u$high <- as.integer(u$vbq_group == "high")
u$female <- as.integer(u$sex == "female")

for (g in c("high", "normal")) {
  s <- u[u$vbq_group == g, ]
  fit <- survfit(Surv(time_days, event) ~ 1, data = s)
  sm <- summary(fit, times = c(90, 180, 365, 730), extend = TRUE)
  for (i in seq_along(sm$time)) out(sprintf("km.%s.surv.%d", g, sm$time[i]), sm$surv[i])
  ar <- summary(fit, times = c(0, 90, 180, 365, 730, 1095), extend = TRUE)
  for (i in seq_along(ar$time)) out(sprintf("km.%s.at_risk.%d", g, ar$time[i]), ar$n.risk[i])
  rev <- survfit(Surv(time_days, 1 - event) ~ 1, data = s)
  q <- quantile(rev, probs = c(0.25, 0.5, 0.75), conf.int = FALSE) / 30.4375
  out(sprintf("fu.%s.q1", g), q[1])
  out(sprintf("fu.%s.median", g), q[2])
  out(sprintf("fu.%s.q3", g), q[3])
  out(sprintf("t1.%s.bmi.median", g), median(s$bmi, na.rm = TRUE))
  out(sprintf("t1.%s.bmi.q1", g), quantile(s$bmi, 0.25, na.rm = TRUE, type = 7))
  out(sprintf("t1.%s.bmi.q3", g), quantile(s$bmi, 0.75, na.rm = TRUE, type = 7))
}
hi <- u[u$high == 1, ]
no <- u[u$high == 0, ]
out("t1.age.p", t.test(hi$age_years, no$age_years)$p.value)
out("t1.bmi.p", wilcox.test(hi$bmi, no$bmi, exact = FALSE, correct = TRUE)$p.value)

lr <- survdiff(Surv(time_days, event) ~ high, data = u)
out("logrank.chisq", lr$chisq)
out("logrank.p", pchisq(lr$chisq, df = 1, lower.tail = FALSE))

u$T <- pmax(u$time_days, 0.5)
cox_out <- function(name, formula, data) {
  fit <- coxph(formula, data = data, ties = "efron", x = TRUE, model = TRUE)
  sc <- summary(fit)
  out(sprintf("cox.%s.hr", name), sc$conf.int[1, 1])
  out(sprintf("cox.%s.lo", name), sc$conf.int[1, 3])
  out(sprintf("cox.%s.hi", name), sc$conf.int[1, 4])
  out(sprintf("cox.%s.p", name), sc$coefficients[1, 5])
  zph <- cox.zph(fit, transform = "rank")$table
  for (term in setdiff(rownames(zph), "GLOBAL")) {
    out(sprintf("ph.%s.%s", name, term), zph[term, "p"])
  }
}
cox_out("group_unadjusted", Surv(T, event) ~ high, u)
cox_out("continuous_unadjusted", Surv(T, event) ~ vbq_used, u)
cc <- u[!is.na(u$age_years) & !is.na(u$bmi), ]
cox_out("group_adjusted", Surv(T, event) ~ high + age_years + female + bmi, cc)

k <- u[(u$event == 1 & u$time_days <= horizon) | u$time_days >= horizon, ]
lab <- as.integer(k$event == 1 & k$time_days <= horizon)
r <- roc(lab, k$vbq_used, levels = c(0, 1), direction = "<", quiet = TRUE)
rci <- ci.auc(r, method = "delong")
out("roc.n", nrow(k))
out("roc.auc", as.numeric(r$auc))
out("roc.lo", rci[1])
out("roc.hi", rci[3])
pred <- k$vbq_used >= threshold
out("roc.sensitivity", sum(pred & lab == 1) / sum(lab == 1))
out("roc.specificity", sum(!pred & lab == 0) / sum(lab == 0))

# Censoring distribution G (reverse Kaplan-Meier, fractures before censorings at ties).
ut <- sort(unique(u$time_days))
G <- numeric(length(ut))
s <- 1
for (i in seq_along(ut)) {
  at <- u$time_days == ut[i]
  n_risk <- sum(u$time_days >= ut[i]) - sum(at & u$event == 1)
  if (n_risk > 0) s <- s * (1 - sum(at & u$event == 0) / n_risk)
  G[i] <- s
}
for (t in c(365, 730)) {
  case <- u$event == 1 & u$time_days <= t
  ctrl <- sort(u$vbq_used[u$time_days > t])
  w <- 1 / G[match(u$time_days[case], ut)]
  sc <- u$vbq_used[case]
  less <- findInterval(sc, ctrl, left.open = TRUE)
  le <- findInterval(sc, ctrl)
  out(sprintf("tdauc.%d", t), sum(w * (less + 0.5 * (le - less))) / (sum(w) * length(ctrl)))
}

for (w in c(60, 112, 180, 365)) {
  elig <- u$high == 1 & u$followup_days >= w
  treated <- elig & !is.na(u$therapy_start_days) & u$therapy_start_days <= w
  out(sprintf("kpi.%d.eligible", w), sum(elig))
  out(sprintf("kpi.%d.pct", w), 100 * sum(treated) / sum(elig))
}
