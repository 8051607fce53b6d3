/** The webhook's one error hierarchy; every class has a stable `code` and names what is wrong. */
export abstract class WebhookError extends Error {
  abstract readonly code: string;
  constructor(
    /** The variable, settings path or pod annotation that is wrong. */
    readonly setting: string,
    problem: string,
  ) {
    super(`${setting} ${problem}`);
    this.name = new.target.name;
  }
}

/** A TB_WEBHOOK_* variable or a key of the sidecar settings file is missing or invalid. */
export class WebhookConfigError extends WebhookError {
  readonly code = 'CONFIG_INVALID';
}

/** A pod's token-broker.io/* annotation is invalid: the pod is refused with this message. */
export class AnnotationError extends WebhookError {
  readonly code = 'ANNOTATION_INVALID';
}
